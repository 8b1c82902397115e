"""megadiff.diffusion"""
