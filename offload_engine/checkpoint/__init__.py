"""What the checkpoint is: its directory and files, where each tensor lies on disk, and the model it describes.

Nothing here knows how the model is run; the experts and the memory plan read from it.
"""
