"""Vision service: media decode and preprocessing, then the ERNIE-4.5-VL vision tower."""
