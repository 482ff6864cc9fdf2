"""sqaudio: discrete speech codecs trained as SQ-VAEs (Takida et al., ICML 2022)."""

__version__ = "0.1.0"
