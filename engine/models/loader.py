"""Load ERNIE-4.5 checkpoints from safetensors in any of their published layouts.

Three layouts carry the same weights:

* **HF** (transformers `save_pretrained`): `model.language_model.layers.N...`, q/k/v and
  gate/up separate, experts stacked `[E, 2I, D]` under `text_moe` / `vision_moe`.
* **Legacy PT** (the `-PT` hub repos written for remote code): `model.layers.N...`, one
  tensor per expert `mlp.experts.J.gate_proj.weight` with J < E text and J >= E vision,
  routers `mlp.gate.weight` / `mlp.gate.weight_1` stored `[D, E]`, both groups' score bias
  in one `mlp.moe_statics.e_score_correction_bias` `[2, E]`, vision under `vision_model`.
* **Paddle** (`-Paddle` repos, FastDeploy's format): the legacy names under `ernie.`, every
  2-D weight but the embedding stored `[in, out]`, q/k/v fused as `qkv_proj` and gate/up as
  `up_gate_proj`.

Each tensor is turned into `Load` instructions against our module tree; the layers own the
copy (merged linears fill one shard, experts one slot). Anything that does not fit — a
wrong shape, a tensor the config has no place for, a parameter nothing filled — fails
with an error naming the tensor and the shapes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from engine.config import ModelConfig
from engine.layers.linear import Linear, MergedLinear, WeightShapeError, check_shape
from engine.layers.moe import Experts


class WeightLoadError(ValueError):
    """The checkpoint does not fit the model its config describes."""


@dataclass
class Load:
    """Copy `tensor` into our parameter `param` (a shard of it, or one expert's slot)."""

    param: str
    tensor: torch.Tensor
    source: str
    shard: int | None = None
    expert: int | None = None
    part: str | None = None  # "gate" | "up" | "down" for per-expert tensors


def checkpoint_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / n for n in names]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise WeightLoadError(f"no *.safetensors files in {path}")
    return files


def read_tensors(
    files: list[Path], keep: Callable[[str], bool] | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every tensor, or only those `keep(name)` accepts (others stay unread)."""
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for name in sf.keys():  # noqa: SIM118 - safe_open has no __iter__
                if keep is None or keep(name):
                    yield name, sf.get_tensor(name)


def detect_layout(names: list[str]) -> str:
    if any(n.startswith("ernie.") or ".qkv_proj." in n or "up_gate_proj" in n for n in names):
        return "paddle"
    if any(re.search(r"\.experts\.\d+\.", n) or "gate.weight_1" in n for n in names):
        return "legacy"
    return "hf"


class WeightMapper:
    """Turns checkpoint (name, tensor) pairs of one layout into `Load`s for our model."""

    def __init__(self, cfg: ModelConfig, layout: str) -> None:
        self.cfg = cfg
        self.layout = layout
        self.vl = cfg.is_multimodal
        self.lm = "language_model." if self.vl else ""

    def target_name(self, name: str) -> str | None:
        """Where checkpoint tensor `name` lands in our tree, before any split or fusion
        (None: not loaded); needs no tensor, so callers can filter before reading."""
        if self.layout == "paddle":
            name = re.sub(r"^ernie\.", "model.", name)
        return self._prefix(name)

    def map(self, name: str, tensor: torch.Tensor) -> list[Load]:
        src = name
        if self.layout == "paddle":
            if (
                tensor.dim() == 2
                and name.endswith((".weight", ".weight_1"))
                and "embed_tokens" not in name
            ):
                tensor = tensor.t()
            name = re.sub(r"^ernie\.", "model.", name)
        name = self._prefix(name)
        if name is None:
            return []
        return self._route(name, tensor, src)

    def _prefix(self, name: str) -> str | None:
        """Strip the layout's prefixes to our tree: `model.`/`language_model.` or a tower."""
        if "mtp" in name or name.endswith("rotary_emb.inv_freq"):
            return None  # multi-token-prediction heads and buffers: not used for serving
        for pat, repl in (
            (r"^(model\.)?vision_(tower|model)\.", "vision_tower."),
            (r"^(model\.)?resampler_model\.", "resampler."),
            (r"^model\.language_model\.", f"{self.lm}model."),
            (r"^model\.", f"{self.lm}model."),
            (r"^lm_head\.", f"{self.lm}lm_head."),
        ):
            if re.match(pat, name):
                name = re.sub(pat, repl, name)
                break
        name = re.sub(r"(spatial|temporal)_linear\.0\.", r"\1_linear.fc1.", name)
        name = re.sub(r"(spatial|temporal)_linear\.2\.", r"\1_linear.fc2.", name)
        name = re.sub(r"(spatial|temporal)_linear\.3\.", r"\1_linear.ln.", name)
        return name

    def _route(self, name: str, t: torch.Tensor, src: str) -> list[Load]:
        m = re.match(r"(.*)\.self_attn\.([qkv])_proj\.(weight|bias)$", name)
        if m:
            shard = "qkv".index(m.group(2))
            return [Load(f"{m.group(1)}.self_attn.qkv_proj.{m.group(3)}", t, src, shard=shard)]
        m = re.match(r"(.*)\.self_attn\.qkv_proj\.(weight|bias)$", name)
        if m:
            return self._split_qkv(m.group(1), m.group(2), t, src)
        m = re.match(r"(.*\.mlp(?:\.shared_experts)?)\.(gate|up)_proj\.(weight|bias)$", name)
        if m:
            shard = 0 if m.group(2) == "gate" else 1
            return [Load(f"{m.group(1)}.gate_up_proj.{m.group(3)}", t, src, shard=shard)]
        m = re.match(r"(.*\.mlp(?:\.shared_experts)?)\.up_gate_proj\.(weight|bias)$", name)
        if m:
            gate, up = t.chunk(2, dim=0)
            p = f"{m.group(1)}.gate_up_proj.{m.group(2)}"
            return [Load(p, gate, src, shard=0), Load(p, up, src, shard=1)]
        if ".mlp." in name and ("experts" in name or ".gate." in name or "moe_statics" in name):
            return self._route_moe(name, t, src)
        return [Load(name, t, src)]

    def _split_qkv(self, prefix: str, kind: str, t: torch.Tensor, src: str) -> list[Load]:
        c = self.cfg.text
        sizes = [c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.num_kv_heads * c.head_dim]
        if t.shape[0] != sum(sizes):
            raise WeightLoadError(
                f"tensor {src!r} has shape {tuple(t.shape)}: its fused q/k/v rows should sum "
                f"to {sum(sizes)} ({sizes})"
            )
        p = f"{prefix}.self_attn.qkv_proj.{kind}"
        return [Load(p, part, src, shard=i) for i, part in enumerate(t.split(sizes, dim=0))]

    def _route_moe(self, name: str, t: torch.Tensor, src: str) -> list[Load]:
        layer, rest = name.split(".mlp.", 1)
        mlp = f"{layer}.mlp"
        if rest.startswith(("text_moe.", "vision_moe.")):  # HF layout, our names but statics
            return [
                Load(
                    f"{mlp}.{rest.replace('gate.moe_statics.', 'gate.')}",
                    t.reshape(-1) if "e_score" in rest else t,
                    src,
                )
            ]
        if rest.startswith("gate.moe_statics."):  # HF text-only MoE
            return [Load(f"{mlp}.text_moe.gate.e_score_correction_bias", t.reshape(-1), src)]
        if rest in ("gate.weight", "gate.weight_1"):
            group = "text_moe" if rest == "gate.weight" else "vision_moe"
            return [Load(f"{mlp}.{group}.gate.weight", self._router(t), src)]
        if rest == "moe_statics.e_score_correction_bias":
            rows = t.reshape(-1, t.shape[-1])
            groups = ["text_moe", "vision_moe"][: rows.shape[0]]
            return [
                Load(f"{mlp}.{g}.gate.e_score_correction_bias", rows[i], src)
                for i, g in enumerate(groups)
            ]
        if rest.startswith("experts.") and rest.split(".")[1] in ("gate_up_proj", "down_proj"):
            return [Load(f"{mlp}.text_moe.{rest}", t, src)]  # HF text-only MoE, stacked
        m = re.match(r"experts\.(\d+)\.(gate|up|down|up_gate)_proj\.weight$", rest)
        if m:
            return self._expert(mlp, int(m.group(1)), m.group(2), t, src)
        return [Load(f"{mlp}.{rest}", t, src)]

    def _router(self, t: torch.Tensor) -> torch.Tensor:
        """Routers are `[E, D]` here; the legacy layout stores them `[D, E]`."""
        d = self.cfg.text.hidden_size
        if self.layout == "legacy" and t.shape[0] == d and (t.shape[1] != d or self.vl):
            return t.t()
        return t

    def _expert(self, mlp: str, j: int, part: str, t: torch.Tensor, src: str) -> list[Load]:
        e = self.cfg.text.num_experts
        group, idx = ("text_moe", j) if j < e else ("vision_moe", j - e)
        param = f"{mlp}.{group}.experts"
        if part == "up_gate":
            gate, up = t.chunk(2, dim=0)
            return [
                Load(param, gate, src, expert=idx, part="gate"),
                Load(param, up, src, expert=idx, part="up"),
            ]
        return [Load(param, t, src, expert=idx, part=part)]


def load_weights(
    model: nn.Module, cfg: ModelConfig, path: Path, only: tuple[str, ...] | None = None
) -> None:
    """Fill every parameter of `model` from the checkpoint in `path`, or raise.

    `only`: prefixes of our tree (e.g. `("vision_tower.", "resampler.")`); tensors landing
    elsewhere are skipped unread, so a part of the model loads from a whole checkpoint.
    """
    files = checkpoint_files(path)
    names = [n for f in files for n in safe_open(str(f), framework="pt").keys()]  # noqa: SIM118
    mapper = WeightMapper(cfg, detect_layout(names))
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    filled: set[str] = set()
    keep = None if only is None else lambda n: (mapper.target_name(n) or "").startswith(only)
    for name, tensor in read_tensors(files, keep):
        for load in mapper.map(name, tensor):
            _apply(load, params, modules)
            key = load.param if load.expert is None else f"{load.param}[{load.expert}].{load.part}"
            filled.add(key)
    _check_complete(model, cfg, filled)


def _apply(load: Load, params: dict[str, nn.Parameter], modules: dict[str, nn.Module]) -> None:
    try:
        if load.expert is not None:
            experts = modules.get(load.param)
            if not isinstance(experts, Experts):
                raise WeightLoadError(f"tensor {load.source!r}: the config has no {load.param}")
            if load.expert >= experts.gate_up_proj.shape[0]:
                raise WeightLoadError(
                    f"tensor {load.source!r}: expert {load.expert} beyond the "
                    f"{experts.gate_up_proj.shape[0]} experts of {load.param}"
                )
            experts.load_expert(load.source, load.tensor, load.expert, str(load.part))
            return
        owner_name, _, leaf = load.param.rpartition(".")
        owner = modules.get(owner_name)
        if isinstance(owner, Experts) and leaf in ("gate_up_proj", "down_proj"):
            owner.load_stacked(load.source, load.tensor, leaf)  # keeps this rank's slice
            return
        if load.shard is not None or isinstance(owner, (Linear, MergedLinear)):
            if not isinstance(owner, (Linear, MergedLinear)):
                raise WeightLoadError(f"tensor {load.source!r}: the config has no {owner_name}")
            owner.load(load.source, load.tensor, load.shard, is_bias=leaf == "bias")
            return
        if load.param not in params:
            raise WeightLoadError(
                f"tensor {load.source!r} (shape {tuple(load.tensor.shape)}) has no place in "
                f"the model its config describes (looked for {load.param!r})"
            )
        target = params[load.param]
        check_shape(load.source, target.shape, load.tensor.shape)
        with torch.no_grad():
            target.copy_(load.tensor)
    except WeightShapeError as e:
        raise WeightLoadError(str(e)) from e


def _check_complete(model: nn.Module, cfg: ModelConfig, filled: set[str]) -> None:
    missing = []
    for name, module in model.named_modules():
        if isinstance(module, Experts) and f"{name}.gate_up_proj" not in filled:
            for e in range(module.gate_up_proj.shape[0]):
                lack = [p for p in ("gate", "up", "down") if f"{name}[{e}].{p}" not in filled]
                if lack:
                    missing.append(f"{name} expert {e} ({'/'.join(lack)})")
    for name, _ in model.named_parameters():  # tied lm_head is not listed: it is the embedding
        if ".experts." in name or name.endswith("e_score_correction_bias"):
            continue  # experts checked above; the score bias is optional (zero)
        if name not in filled:
            missing.append(name)
    if missing:
        shown = ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else "")
        raise WeightLoadError(
            f"checkpoint lacks {len(missing)} tensor(s) the config needs: {shown}"
        )
