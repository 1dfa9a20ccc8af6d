"""Generators and preparers: data sets written to disk, atomically, in the layouts patchgd reads
(UltraMNIST, Megapixel MNIST and their digit sources, PANDA, TCGA, aeon's time series, synthetic slides)."""
