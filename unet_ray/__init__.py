"""unet_ray: VGG16_bn U-Net nucleus segmentation on Ray."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("unet_ray")  # the installed distribution's (pyproject.toml)
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"
