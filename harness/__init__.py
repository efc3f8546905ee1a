"""wan-trt-bench: does TensorRT make Wan2.2-T2V-A14B faster than PyTorch while the video stays the same?"""
