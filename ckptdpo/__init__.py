"""ckptdpo: checkpoint resampling, DTO and preference training for reasoning models."""

__version__ = "0.1.0"
