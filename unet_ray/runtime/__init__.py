"""Layer 4: running on Ray (start-up, logging, Ray Data stage helpers, progress); nothing about nuclei."""
