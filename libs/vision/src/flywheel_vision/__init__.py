"""Vision model, preprocessing, training loop and export; arrives with training."""
