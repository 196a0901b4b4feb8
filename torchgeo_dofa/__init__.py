"""torchgeo-dofa: DOFA on TorchGeo + Lightning."""
