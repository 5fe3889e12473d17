"""TCAE: the Twin-Cycle Autoencoder (Li et al., CVPR 2019) on the tcae-kernels warp.

``tcae.model`` holds the network (:class:`~tcae.model.TCAE`,
:class:`~tcae.model.TCAEConfig`), ``tcae.losses`` its losses and the
curriculum. Submodules are imported on demand so that ``import tcae`` stays
cheap.
"""
