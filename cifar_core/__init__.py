"""CIFAR-10 Lab core library: data, augmentations, models, training engine, run records.

Plain Python and PyTorch; no Streamlit import anywhere in this package.
"""
__version__ = "0.1.0"
