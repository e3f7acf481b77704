"""The sizes every stage agrees on: the encoder input, the image embedding and the feature grid."""

IMAGE_SIZE = 1024  # the encoder input: longest side resized to this, padded to IMAGE_SIZE x IMAGE_SIZE
EMBEDDING_SHAPE = (256, 64, 64)  # channels x grid x grid of the image embedding
GRID = EMBEDDING_SHAPE[1]  # the feature grid (64 x 64); the early feature shares it
FEATURE_STRIDE = IMAGE_SIZE // GRID  # encoder-input pixels per feature cell (16)
PLANE_STRIDE = 4  # encoder-input pixels per pixel of the stride-4 plane stored beside each entry
PLANE_SHAPE = (3, IMAGE_SIZE // PLANE_STRIDE, IMAGE_SIZE // PLANE_STRIDE)  # 3 x 256 x 256 uint8
