"""Reports and pictures: the credit picture, curves."""
