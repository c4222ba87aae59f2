"""Layer 1: numbers and arrays (configs, schedules, losses, metrics, tiling, instances, the network, region geometry); no Ray, no storage."""
