"""lipcert models: PyTorch sandwich (LBDN) layers, baselines, training and export to the sdp IR."""
