"""The model: configs per family, the decoder, attention, random-weight models."""
