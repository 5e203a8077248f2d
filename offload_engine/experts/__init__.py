"""The experts at run time: their host-side store, the device slot pool and how experts reach it, eviction
policies, and the MoE layer call that serves transformers from them."""
