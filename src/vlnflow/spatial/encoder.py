"""SpatialEncoder: what the rest of vlnflow calls to turn a sample's frames into its cached feature.

The feature of a sample is the kept layer's (default -2) patch tokens of the
LAST streamed frame, after causal streaming over the sample's frames, cut to
whole 2x2 merge blocks (crop frames: 35x46 patches -> 34x46, as the reference
crops before its merger; vlnflow.spatial.geometry); with
`reference_frame: last` the frames are reversed before streaming (JanusVLN's
training default), with `first` they stream oldest-first. `encode` computes it
for a batch in one block-causal pass, `encode_indexed` does the same while
running DINOv2 once per unique image, and `encode_streaming` is the
frame-by-frame reference the others are tested and benchmarked against.

On CPU everything is float32 (exact against the parity fixtures); on CUDA the
matmuls and attention run in the configured dtype (bf16) with float32 residual
stream, LayerNorms and RoPE, as the reference does under autocast.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

import torch

from vlnflow import fa4
from vlnflow.errors import UserError
from vlnflow.spatial.attention import KERNELS
from vlnflow.spatial.aggregator import PRESETS, Aggregator, StreamCache
from vlnflow.spatial.checkpoint import find_weights_file, load_aggregator_weights
from vlnflow.spatial.fingerprint import CODE_VERSION, fingerprint_of, weights_digest
from vlnflow.spatial.geometry import FrameGeometry, geometry_of, merge_crop
from vlnflow.spatial.init import build_aggregator, init_random_, matmul_modules
from vlnflow.spatial.layers import Block
from vlnflow.spatial.shapes import ShapePolicy, compiled_block_fns

log = logging.getLogger(__name__)

# Bump (in fingerprint.py) when a code change alters the features computed from the same settings.
ENCODER_CODE_VERSION = CODE_VERSION
SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "math": "MATH"}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
COMPILE_SETTINGS = {"auto": None, "on": True, "off": False}  # spatial.compile; auto = on CUDA only


class SpatialEncoder:
    def __init__(
        self,
        model: Aggregator,
        *,
        weights_id: str,
        geometry: FrameGeometry,
        layer: int = -2,
        reference_frame: str = "last",
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.bfloat16,
        batch_size: int = 4,
        compile_blocks: bool | None = None,
        global_backend: str = "prefix",
        sdpa_backend: str | None = None,
        attention: str = "auto",
        shapes: ShapePolicy | None = None,
    ):
        """Wrap `model` (float32 on the CPU, or already built on `device` in the compute dtypes); its matmul
        weights are cast to the compute dtype and it is moved to `device` (no-ops when built there).

        On CPU the compute dtype is always float32. `compile_blocks` compiles the two
        non-attention halves of a block with torch.compile (default: on CUDA only, where
        it measured 1.6x faster; the first call then compiles for ~20 s); `global_backend` picks
        the block-causal attention (prefix | flex); `sdpa_backend` (flash | cudnn |
        efficient | math) pins SDPA's kernel instead of letting PyTorch choose; `attention`
        (auto | flash_attn_4 | sdpa, the `spatial.attention` setting) picks the attention kernel
        of the batched paths: auto = flash-attn-4 on a CUDA sm90+ device in bf16/fp16, else SDPA.
        `shapes` (vlnflow.spatial.shapes) says which batch axes the compiled code treats as dynamic and how
        callers pad batches (default: the `dynamic` policy at `batch_size`).
        """
        if reference_frame not in ("first", "last"):
            raise UserError(f"spatial.reference_frame must be 'first' or 'last', got {reference_frame!r}")
        try:
            self.layer = model.layer_index(layer)
        except ValueError as exc:
            raise UserError(str(exc)) from exc
        self.device = torch.device(device)
        self.configured_dtype = dtype
        self.compute_dtype = dtype if self.device.type == "cuda" else torch.float32
        self.geometry = geometry
        self.reference_frame = reference_frame
        self.batch_size = batch_size
        self.weights_id = weights_id
        self.model = _prepare(model, self.device, self.compute_dtype)
        self.shapes = shapes or ShapePolicy(batch_size=batch_size)
        if compile_blocks is None:
            compile_blocks = self.device.type == "cuda"
        self.configure(compile_blocks=compile_blocks, global_backend=global_backend, sdpa_backend=sdpa_backend, attention=attention)
        log.info("VGGT attention kernel: %s (spatial.attention=%s, %s)", self.attention_kernel, attention, self.device)

    def configure(
        self, *, compile_blocks: bool = False, global_backend: str = "prefix", sdpa_backend: str | None = None,
        attention: str | None = None, shapes: ShapePolicy | None = None,
    ) -> None:
        """Choose how the same math is executed (results agree to rounding; not part of the fingerprint).

        `attention` None keeps the current kernel, `shapes` None the current shape policy.
        """
        if shapes is not None:
            self.shapes = shapes
        if attention is not None:
            self.model.attention_kernel = self.attention_kernel_for(attention)
        if global_backend not in ("prefix", "flex"):
            raise UserError(f"global attention backend must be 'prefix' or 'flex', got {global_backend!r}")
        if sdpa_backend is not None and sdpa_backend not in SDPA_BACKENDS:
            raise UserError(f"sdpa_backend must be one of {sorted(SDPA_BACKENDS)}, got {sdpa_backend!r}")
        self.model.global_backend = global_backend
        self.sdpa_backend = sdpa_backend
        self.compile_blocks = compile_blocks
        if compile_blocks:
            self.model.qkv_fn, self.model.residual_fn = compiled_block_fns(self.shapes, Block.qkv_heads, Block.residual)
        else:
            self.model.qkv_fn, self.model.residual_fn = Block.qkv_heads, Block.residual

    def attention_kernel_for(self, setting: str) -> str:
        """`spatial.attention` resolved on this encoder's device and compute dtype: flash_attn_4 or sdpa."""
        kernel = fa4.resolve(setting, "spatial.attention", self.device, "sdpa", KERNELS)
        if kernel == fa4.FA4 and self.compute_dtype not in fa4.HALF:
            if setting == fa4.FA4:
                raise UserError(f"spatial.attention is {fa4.FA4!r}, which needs spatial.dtype bfloat16 or float16")
            kernel = "sdpa"
        return kernel

    @property
    def attention_kernel(self) -> str:
        return self.model.attention_kernel

    # ---- construction -------------------------------------------------------------------

    @classmethod
    def from_config(cls, spatial_cfg: dict, **options) -> SpatialEncoder:
        """Build from the validated `spatial` section of config.yaml (extra keyword options pass through).

        The model is built on its device in the compute dtypes and the weights are read onto it (a GPU job
        never holds a float32 copy on the host). The weights' digest comes from the digest cache that the
        parse-time fingerprint filled (`weights_digest`), so the file is read once, not hashed per job.
        """
        preset = spatial_cfg.get("preset", "tiny")
        if preset not in PRESETS:
            raise UserError(f"spatial.preset must be one of {sorted(PRESETS)}, got {preset!r}")
        dtype_name = spatial_cfg.get("dtype", "bfloat16")
        if dtype_name not in DTYPES:
            raise UserError(f"spatial.dtype must be one of {sorted(DTYPES)}, got {dtype_name!r}")
        device = resolve_device(spatial_cfg.get("device", "auto"))
        compute_dtype = DTYPES[dtype_name] if device.type == "cuda" else torch.float32
        clock = time.perf_counter()
        if device.type == "cuda":
            torch.zeros(1, device=device)  # the CUDA context, timed apart from the weights
        split = {"device_init": time.perf_counter() - clock}
        model = build_aggregator(PRESETS[preset], device=device, matmul_dtype=compute_dtype)
        split["build"] = time.perf_counter() - clock - split["device_init"]
        weights = spatial_cfg.get("weights")
        if weights:
            file = find_weights_file(Path(weights).expanduser())
            weights_id = "sha256:" + weights_digest(file)  # cached by (path, size, mtime) after the first read
            load_aggregator_weights(model, file, digest=False)
        else:
            seed = int(spatial_cfg.get("seed", 0))
            init_random_(model, seed)
            weights_id = f"random:{preset}:seed={seed}"
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        split["read"] = time.perf_counter() - clock - split["device_init"] - split["build"]
        clock = time.perf_counter()
        compile_setting = spatial_cfg.get("compile", "auto")
        if compile_setting not in COMPILE_SETTINGS:
            raise UserError(f"spatial.compile must be one of {sorted(COMPILE_SETTINGS)}, got {compile_setting!r}")
        options.setdefault("compile_blocks", COMPILE_SETTINGS[compile_setting])
        options.setdefault("shapes", ShapePolicy.from_config(spatial_cfg))
        encoder = cls(
            model,
            weights_id=weights_id,
            geometry=geometry_of(spatial_cfg),
            layer=int(spatial_cfg.get("layer", -2)),
            reference_frame=spatial_cfg.get("reference_frame", "last"),
            device=device,
            dtype=DTYPES[dtype_name],
            batch_size=int(spatial_cfg.get("batch_size", 4)),
            **{"attention": spatial_cfg.get("attention", "auto"), **options},
        )
        split["kernels"] = time.perf_counter() - clock  # the attention kernel chosen (flash-attn-4 imported), compile set up
        encoder.load_split_s = split  # what the precompute job's set-up split shows under weights
        return encoder

    # ---- shapes and identity ------------------------------------------------------------

    @property
    def grid(self) -> tuple[int, int]:
        """(rows, columns) of one output feature map: the geometry's kept grid (34x46 crop, 46x46 pad at 644)."""
        return self.geometry.kept_grid

    @property
    def feature_shape(self) -> tuple[int, int]:
        """(tokens, channels) of one output feature map: (1564, 2048) crop, (2116, 2048) pad for VGGT-1B at 644."""
        return self.geometry.feature_tokens, 2 * self.model.config.embed_dim

    @property
    def output_dtype(self) -> torch.dtype:
        return self.compute_dtype

    def fingerprint_fields(self) -> dict:
        """Everything that determines the cached feature values (see `fingerprint`).

        The same dict `vlnflow.spatial.fingerprint.fingerprint_fields(spatial_cfg)` builds
        from settings alone: the dtype is the configured one, so a CPU login node, the GPU
        jobs and the training ranks agree.
        """
        return {
            "code_version": ENCODER_CODE_VERSION,
            "weights": self.weights_id,
            "architecture": self.model.config.as_dict(),
            "preprocess": self.geometry.fingerprint_fields(),
            "layer": self.layer,
            "reference_frame": self.reference_frame,
            "compute_dtype": str(self.configured_dtype).removeprefix("torch."),
        }

    def fingerprint(self) -> str:
        """Stable sha256 of `fingerprint_fields()`: same settings and weights give the same string anywhere."""
        return fingerprint_of(self.fingerprint_fields())

    # ---- encoding -----------------------------------------------------------------------

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """frames (B, S, 3, H, W) in [0, 1] -> (B, grid_h * grid_w, C): one block-causal pass."""
        self._check_images(frames, 5, "frames")
        b, s = frames.shape[:2]
        with torch.inference_mode():
            x = frames.to(self.device, non_blocking=True)
            if self.reference_frame == "last":
                x = x.flip(1)
            with self._attention_context():
                patches = self.model.embed(x.flatten(0, 1))
            return self._trunk(patches.unflatten(0, (b, s)), x.shape[-2:])

    def encode_indexed(self, images: torch.Tensor, frame_index: torch.Tensor) -> torch.Tensor:
        """Unique images (U, 3, H, W) + per-sample frame lists (B, S) into them -> (B, P, C).

        Equals `encode(images[frame_index])`, but DINOv2 runs once per unique image.
        """
        self._check_images(images, 4, "images")
        if frame_index.dim() != 2 or frame_index.dtype not in (torch.int32, torch.int64):
            raise UserError(f"frame_index must be an integer tensor (B, S), got {frame_index.dtype} {tuple(frame_index.shape)}")
        if frame_index.device.type == "cpu" and frame_index.numel():
            lo, hi = int(frame_index.min()), int(frame_index.max())
            if lo < 0 or hi >= images.shape[0]:
                raise UserError(f"frame_index refers to image {lo if lo < 0 else hi}, but only {images.shape[0]} images were given")
        with torch.inference_mode():
            index = frame_index.long().to(self.device, non_blocking=True)
            if self.reference_frame == "last":
                index = index.flip(1)
            with self._attention_context():
                patches = self.model.embed(images.to(self.device, non_blocking=True))
            return self._trunk(patches[index], images.shape[-2:])

    def encode_streaming(self, frames: torch.Tensor, all_layers: bool = False) -> torch.Tensor:
        """The reference: each sample alone, frame by frame through a KV cache (tests and benchmark only).

        `all_layers=True` runs every layer for every frame, as JanusVLN training does;
        by default each frame stops after the kept layer (same result).
        """
        self._check_images(frames, 5, "frames")
        layers = None if all_layers else [self.layer]
        out = []
        with torch.inference_mode():
            x = frames.to(self.device)
            if self.reference_frame == "last":
                x = x.flip(1)
            with self._attention_context():
                for sample in x:
                    cache = StreamCache()
                    for frame in sample:
                        per_layer = self.model.stream_frame(frame.unsqueeze(0), cache, layers)
                    kept = per_layer[self.layer] if all_layers else per_layer[0]
                    out.append(kept[0, self.model.patch_start_idx :])
        return self._merge_crop(torch.stack(out), x.shape[-2:]).to(self.output_dtype)

    # ---- internals ----------------------------------------------------------------------

    def _trunk(self, patches: torch.Tensor, hw) -> torch.Tensor:
        grid = (hw[0] // self.model.config.patch_size, hw[1] // self.model.config.patch_size)
        with self._attention_context():
            out = self.model.last_frame_features(patches, grid, self.layer)
        return self._merge_crop(out, hw).to(self.output_dtype)

    def _merge_crop(self, tokens: torch.Tensor, hw) -> torch.Tensor:
        """(B, gh * gw, C) -> (B, kh * kw, C): the grid's first rows / columns in whole 2x2 blocks (no copy when even)."""
        grid = (hw[0] // self.model.config.patch_size, hw[1] // self.model.config.patch_size)
        kept = merge_crop(grid)
        if kept == grid:
            return tokens
        b, _, c = tokens.shape
        return tokens.view(b, *grid, c)[:, : kept[0], : kept[1]].reshape(b, kept[0] * kept[1], c)

    def _attention_context(self):
        if self.sdpa_backend is None:
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([getattr(SDPBackend, SDPA_BACKENDS[self.sdpa_backend])])

    def _check_images(self, x: torch.Tensor, dims: int, name: str) -> None:
        p = self.model.config.patch_size
        if x.dim() != dims or x.shape[-3] != 3 or x.shape[-1] % p or x.shape[-2] % p:
            want = "(B, S, 3, H, W)" if dims == 5 else "(U, 3, H, W)"
            raise UserError(
                f"{name} must have shape {want} with H and W multiples of {p}; got {tuple(x.shape)} "
                f"({self.geometry.describe()})"
            )
        if not x.is_floating_point():
            raise UserError(f"{name} must be float images in [0, 1], got dtype {x.dtype}")


def resolve_device(name: str) -> torch.device:
    """`auto` -> cuda when available, else cpu; `cuda` without a GPU is an error naming the setting."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("spatial.device is 'cuda' but no CUDA device is available")
    if name not in ("cpu", "cuda"):
        raise UserError(f"spatial.device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


def _prepare(model: Aggregator, device: torch.device, dtype: torch.dtype) -> Aggregator:
    """Matmul weights (Linear, patch conv) to the compute dtype, the rest stays float32; move; freeze."""
    for module in matmul_modules(model):
        module.to(dtype)
    model = model.to(device).eval()
    model.requires_grad_(False)
    return model
