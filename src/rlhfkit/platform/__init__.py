"""Where and how models run, below everything else: placement and precision (:mod:`.placement`), the
distributed strategies through accelerate (:mod:`.distributed`: FSDP2 and DeepSpeed settings, gathering and
sharding), and the CPU kernels (:mod:`.kernels`: the bf16 route, oneDNN linears, packed decode weights,
memory release). ``train/`` holds training and ``rollout/`` sampling; both call down into this.
"""
