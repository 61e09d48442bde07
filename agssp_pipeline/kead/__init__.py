"""KeAD anomaly maps: encoders (CLIP KeAD, WinCLIP, CNN few-shot), the map store and the batch runner."""
