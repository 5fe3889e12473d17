"""TCAE: the Twin-Cycle Autoencoder (Li et al., CVPR 2019) on the tcae-kernels warp.

``tcae.model`` holds the network (:class:`~tcae.model.TCAE`,
:class:`~tcae.model.TCAEConfig`), ``tcae.losses`` its losses and the
curriculum, ``tcae.train`` the training loop (its settings and recipes in
``tcae.config``), ``tcae.learning`` the learning check. Data: ``tcae.frames``
(frames and training pairs), ``tcae.labels`` (label CSVs), ``tcae.videos``
(video preparation), ``tcae.synthetic``. Submodules are imported on demand so
that ``import tcae`` stays cheap.
"""
