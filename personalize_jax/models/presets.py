"""The ``tiny`` preset: small random models usable wherever a checkpoint path is.

``from_pretrained("tiny")`` on any model class builds the config below with
random weights from a seed. The shapes fit together as a Stable Diffusion
pipeline does: the text width is the U-Net's ``cross_attention_dim``, the VAE
downsamples by 8 into 4 latent channels (64 px images -> 8x8 latents), and the
text encoder uses the real CLIP BPE vocabulary (49,408 tokens) so the real
tokenizer works with it. Configs use the Hugging Face field names, so a tiny
model saved with ``save_pretrained`` loads in diffusers/transformers.
"""

TINY = "tiny"

TINY_RESOLUTION = 64

UNET = {
    "_class_name": "UNet2DConditionModel",
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [32, 64],
    "layers_per_block": 2,
    "attention_head_dim": 8,
    "cross_attention_dim": 32,
    "norm_num_groups": 8,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
}

VAE = {
    "_class_name": "AutoencoderKL",
    "sample_size": TINY_RESOLUTION,
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [16, 32, 32, 32],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "scaling_factor": 0.18215,
}

CLIP_TEXT = {
    "model_type": "clip_text_model",
    "architectures": ["CLIPTextModel"],
    "vocab_size": 49408,
    "hidden_size": 32,
    "intermediate_size": 64,
    "projection_dim": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 49407,
}

CLIP_VISION = {
    "model_type": "clip_vision_model",
    "hidden_size": 32,
    "intermediate_size": 64,
    "projection_dim": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": 32,
    "patch_size": 8,
    "num_channels": 3,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}

CLIP = {
    "model_type": "clip",
    "architectures": ["CLIPModel"],
    "projection_dim": 32,
    "logit_scale_init_value": 2.6592,
    "text_config": CLIP_TEXT,
    "vision_config": CLIP_VISION,
}

DINO_VIT = {
    "model_type": "vit",
    "architectures": ["ViTModel"],
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": 32,
    "patch_size": 8,
    "num_channels": 3,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-12,
    "qkv_bias": True,
}

DINOV2 = {
    "model_type": "dinov2",
    "architectures": ["Dinov2Model"],
    "hidden_size": 32,
    "intermediate_size": 128,
    "mlp_ratio": 4,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": 32,
    "patch_size": 8,
    "num_channels": 3,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-6,
    "layerscale_value": 1.0,
    "qkv_bias": True,
    "use_swiglu_ffn": False,
}

SCHEDULER = {
    "_class_name": "DDIMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "timestep_spacing": "leading",
}

# Image processors (preprocessor_config.json) for the tiny CLIP and DINO models.
CLIP_PROCESSOR = {
    "image_processor_type": "CLIPImageProcessor",
    "do_resize": True, "size": {"shortest_edge": 32},
    "do_center_crop": True, "crop_size": {"height": 32, "width": 32},
    "do_rescale": True, "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
}

DINO_PROCESSOR = {
    "image_processor_type": "ViTImageProcessor",
    "do_resize": True, "size": {"height": 32, "width": 32},
    "do_rescale": True, "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225],
    "resample": 2,
}

# A tiny SDXL, shaped like diffusers' own SDXL test models: the U-Net reads the
# two text encoders' hidden states side by side (32 + 32 = 64 wide) and, as
# its added embedding, the second one's projected pooled output (32) with 6
# time ids x 8 sinusoids (80 in all). The second tokenizer pads with "!" (0).
TINY_SDXL_UNET = dict(
    UNET,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
    attention_head_dim=[2, 4],
    transformer_layers_per_block=[1, 2],
    use_linear_projection=True,
    cross_attention_dim=64,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=80,
)

TINY_SDXL_TEXT = dict(CLIP_TEXT)

TINY_SDXL_TEXT_2 = dict(
    CLIP_TEXT, architectures=["CLIPTextModelWithProjection"],
    hidden_act="gelu", pad_token_id=0)

# ------------------------------------------------ published configurations
# The config.json values of the published Stable Diffusion checkpoints, for
# building their shapes without a download (abstract models: ahead-of-time
# compiles and memory reports). Loading a checkpoint reads its own files.

_SD_UNET_BLOCKS = {
    "_class_name": "UNet2DConditionModel",
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
    "in_channels": 4, "out_channels": 4, "norm_num_groups": 32,
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0,
}
# SD 1.x: CLIP ViT-L/14 text (768 wide), one head count, conv projections.
SD14_UNET = dict(_SD_UNET_BLOCKS, sample_size=64, attention_head_dim=8,
                 cross_attention_dim=768)
# SD 2.x: OpenCLIP ViT-H/14 text (1024 wide), 64-wide heads, linear projections.
SD21_BASE_UNET = dict(_SD_UNET_BLOCKS, sample_size=64,
                      attention_head_dim=[5, 10, 20, 20],
                      cross_attention_dim=1024, use_linear_projection=True)
SD21_UNET = dict(SD21_BASE_UNET, sample_size=96, upcast_attention=True)

SD14_TEXT = {"vocab_size": 49408, "hidden_size": 768,
             "intermediate_size": 3072, "num_hidden_layers": 12,
             "num_attention_heads": 12, "max_position_embeddings": 77,
             "hidden_act": "quick_gelu", "projection_dim": 768}
SD21_TEXT = {"vocab_size": 49408, "hidden_size": 1024,
             "intermediate_size": 4096, "num_hidden_layers": 23,
             "num_attention_heads": 16, "max_position_embeddings": 77,
             "hidden_act": "gelu", "projection_dim": 512}
# The VAE of every SD 1.x/2.x checkpoint (83,653,863 parameters).
SD_VAE = {
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3, "out_channels": 3, "latent_channels": 4,
    "layers_per_block": 2, "norm_num_groups": 32, "act_fn": "silu",
    "sample_size": 512, "scaling_factor": 0.18215,
}

# stabilityai/stable-diffusion-xl-base-1.0: a 3-level U-Net (2,567,463,684
# parameters) reading both text encoders' penultimate states side by side
# (768 + 1280 = 2048) and, added to the time embedding, the second encoder's
# projected pooled output with 6 time ids x 256 sinusoids (1280 + 1536).
SDXL_UNET = dict(
    _SD_UNET_BLOCKS, sample_size=128,
    down_block_types=["DownBlock2D"] + ["CrossAttnDownBlock2D"] * 2,
    up_block_types=["CrossAttnUpBlock2D"] * 2 + ["UpBlock2D"],
    block_out_channels=[320, 640, 1280], attention_head_dim=[5, 10, 20],
    transformer_layers_per_block=[1, 2, 10], cross_attention_dim=2048,
    use_linear_projection=True, upcast_attention=None,
    addition_embed_type="text_time", addition_embed_type_num_heads=64,
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
# The first text encoder is SD 1.x's CLIP ViT-L/14 text model.
SDXL_TEXT = dict(SD14_TEXT)
# OpenCLIP ViT-bigG/14 text, a CLIPTextModelWithProjection (694,659,840).
SDXL_TEXT_2 = {"vocab_size": 49408, "hidden_size": 1280,
               "intermediate_size": 5120, "num_hidden_layers": 32,
               "num_attention_heads": 20, "max_position_embeddings": 77,
               "hidden_act": "gelu", "projection_dim": 1280}
# SD's VAE retrained: its own latent scale, and it overflows in float16.
SDXL_VAE = dict(SD_VAE, sample_size=1024, scaling_factor=0.13025,
                force_upcast=True)

# Hub id -> {"unet", "text_encoder", "vae"} configs.
PUBLISHED = {
    "CompVis/stable-diffusion-v1-4": {
        "unet": SD14_UNET, "text_encoder": SD14_TEXT, "vae": SD_VAE},
    "stable-diffusion-v1-5/stable-diffusion-v1-5": {
        "unet": SD14_UNET, "text_encoder": SD14_TEXT, "vae": SD_VAE},
    "stabilityai/stable-diffusion-2-1-base": {
        "unet": SD21_BASE_UNET, "text_encoder": SD21_TEXT, "vae": SD_VAE},
    "stabilityai/stable-diffusion-2-1": {
        "unet": SD21_UNET, "text_encoder": SD21_TEXT,
        "vae": dict(SD_VAE, sample_size=768)},
}

# ------------------------------------------------ ALIGN (kakaobrain/align-base)
# config.json of kakaobrain/align-base: BERT-base text (bert-base-uncased) and
# an EfficientNet-B7 image tower; 172,117,841 parameters. As written by
# transformers' ALIGN conversion script: EfficientNet-B7 with image_size 289
# and hidden_dim 640 (only the pooling window: a global mean).
ALIGN_BASE = {
    "model_type": "align",
    "architectures": ["AlignModel"],
    "projection_dim": 640,
    "temperature_init_value": 1.0,
    "text_config": {
        "model_type": "align_text_model", "vocab_size": 30522,
        "hidden_size": 768, "num_hidden_layers": 12,
        "num_attention_heads": 12, "intermediate_size": 3072,
        "hidden_act": "gelu", "max_position_embeddings": 512,
        "type_vocab_size": 2, "layer_norm_eps": 1e-12, "pad_token_id": 0},
    "vision_config": {
        "model_type": "align_vision_model", "num_channels": 3,
        "image_size": 289, "width_coefficient": 2.0,
        "depth_coefficient": 3.1, "depth_divisor": 8,
        "kernel_sizes": [3, 3, 5, 3, 5, 5, 3],
        "in_channels": [32, 16, 24, 40, 80, 112, 192],
        "out_channels": [16, 24, 40, 80, 112, 192, 320],
        "depthwise_padding": [], "strides": [1, 2, 2, 2, 1, 2, 1],
        "num_block_repeats": [1, 2, 2, 3, 3, 4, 1],
        "expand_ratios": [1, 6, 6, 6, 6, 6, 6],
        "squeeze_expansion_ratio": 0.25, "hidden_act": "swish",
        "hidden_dim": 640, "pooling_type": "mean", "batch_norm_eps": 1e-3},
}
# Its preprocessor_config.json: a 346 px square bilinear resize, a 289 px
# center crop, pixels / 127.5 - 1, no mean/std normalisation.
ALIGN_PROCESSOR = {
    "image_processor_type": "EfficientNetImageProcessor",
    "do_resize": True, "size": {"height": 346, "width": 346}, "resample": 2,
    "do_center_crop": True, "crop_size": {"height": 289, "width": 289},
    "do_rescale": True, "rescale_factor": 1 / 127.5, "rescale_offset": True,
    "do_normalize": False, "include_top": False,
    "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
}
# A tiny ALIGN: the BERT vocabulary (so the real tokenizer fits), 2 text
# layers, and 4 EfficientNet blocks (expansion, both stride-2 paddings, a
# residual) ending in 16 channels, the projection width.
ALIGN_TINY = {
    "model_type": "align",
    "architectures": ["AlignModel"],
    "projection_dim": 16,
    "temperature_init_value": 1.0,
    "text_config": {
        "model_type": "align_text_model", "vocab_size": 30522,
        "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 64, "max_position_embeddings": 64},
    "vision_config": {
        "model_type": "align_vision_model", "image_size": 32,
        "width_coefficient": 0.25, "depth_coefficient": 0.5,
        "kernel_sizes": [3, 5, 3], "in_channels": [32, 16, 24],
        "out_channels": [16, 24, 40], "strides": [1, 2, 2],
        "num_block_repeats": [1, 2, 3], "expand_ratios": [1, 6, 6],
        "depthwise_padding": [2], "hidden_dim": 64},
}
ALIGN_TINY_PROCESSOR = dict(
    ALIGN_PROCESSOR, size={"height": 40, "width": 40},
    crop_size={"height": 32, "width": 32})

# ------------------------------------------------------------- SDXL pipelines
# ``load_stable_diffusion("tiny-sdxl")``: the tiny SDXL models above, a tiny
# VAE with SDXL's latent scale, and the tiny schedule.
TINY_SDXL = "tiny-sdxl"
TINY_SDXL_VAE = dict(VAE, scaling_factor=0.13025, force_upcast=True)

PUBLISHED["stabilityai/stable-diffusion-xl-base-1.0"] = {
    "unet": SDXL_UNET, "text_encoder": SDXL_TEXT,
    "text_encoder_2": SDXL_TEXT_2, "vae": SDXL_VAE}
