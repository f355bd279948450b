"""LUNA16 data: the CSV tables and series layout, the CT cache, datasets, masks, sampling and augmentation."""
