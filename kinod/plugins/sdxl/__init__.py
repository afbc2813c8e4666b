"""The ``sdxl`` plugin: Stable Diffusion XL images, made by driving a ComfyUI server."""
