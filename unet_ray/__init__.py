"""unet_ray: VGG16_bn U-Net nucleus segmentation on Ray."""
