"""LoKr and LoHa files in LyCORIS' layout (`formats.lycoris`) into a pipeline's UNet and text encoders, through peft.

diffusers 0.42 has no reader of these files in its SD and SDXL pipelines (its LoKr readers are Z-Image's and
Flux.2's), so peft's LoKr or LoHa layers are put in under the adapter's name, with a config that builds each layer's
factors in the file's shapes; diffusers' `set_adapters`, `fuse_lora` and `unload_lora_weights` then handle them as any
adapter. Each layer finds its module by its kohya name, as `formats.lora_fit` finds a LoRA layer's.
"""

from __future__ import annotations

import re
from pathlib import Path

from dreambooth.errors import UserError
from dreambooth.formats.lora import read_safetensors
from dreambooth.formats.lora_fit import KOHYA_PARTS, flat_name, module_index
from dreambooth.formats.lycoris import (
    ADAPTER_PARAMETERS,
    KINDS,
    TITLES,
    factor_shape,
    fold_scale,
    layers_of,
    lycoris_kind,
)
from dreambooth.models.layout import pipeline_layout


def _lokr_config(layers: dict[str, dict]):
    """peft's LoKrConfig that builds each layer's factors in the shapes the file has: the decompose_factor that splits
    every layer as it is split (tried as diffusers' own LoKr reader tries it), the rank of each decomposed factor, and
    a rank large enough to keep whole factors whole."""
    from peft import LoKrConfig
    from peft.tuners.lokr.layer import factorization

    split, ranks = {}, {}
    for module, w in layers.items():
        shapes = {name: tuple(value.shape) for name, value in w.items()}
        (a, b), (c, d) = factor_shape(shapes, "lokr_w1"), factor_shape(shapes, "lokr_w2")
        split[module] = ((a, c), (b, d))
        low = w.get("lokr_w1_a", w.get("lokr_w2_a"))
        ranks[module] = low.shape[1] if low is not None else max(a, b, c, d)
    for factor in sorted({outs[0] for outs, _ in split.values()}) + [-1]:
        if all(factorization(o1 * o2, factor) == (o1, o2) and factorization(i1 * i2, factor) == (i1, i2)
               for (o1, o2), (i1, i2) in split.values()):
            break
    else:
        raise UserError("its LoKr factors split the layers in ways no one factor gives (peft, which draws it, "
                        "splits every layer by one factor)")
    return _config(LoKrConfig, ranks, decompose_factor=factor,
                   decompose_both=any("lokr_w1_a" in w for w in layers.values()))


def _config(cls, ranks: dict[str, int], **kw):
    """A peft LyCORIS config adapting exactly `ranks`' modules at their ranks, each at scale 1 (alpha = r)."""
    common = max(set(ranks.values()), key=list(ranks.values()).count)
    pattern = {re.escape(m): r for m, r in ranks.items() if r != common}
    return cls(r=common, alpha=common, rank_pattern=pattern, alpha_pattern=dict(pattern),
               target_modules=sorted(ranks), **kw)


def _loha_config(layers: dict[str, dict]):
    from peft import LoHaConfig

    return _config(LoHaConfig, {module: w["hada_w1_b"].shape[0] for module, w in layers.items()})


def _by_module(pipe, file: Path, layers: dict[str, dict]) -> dict[str, dict[str, dict]]:
    """The file's layers by the pipeline's component and module ({component: {module path: tensors}}); a layer with
    no module of its name, or with tensors beyond the kind's, is refused."""
    index = module_index(pipeline_layout(pipe, ""))
    found: dict[str, dict[str, dict]] = {}
    unknown = []
    for layer, parts in layers.items():
        prefix = next((p for p in KOHYA_PARTS if layer.startswith(p)), "")
        component = KOHYA_PARTS.get(prefix)
        module = index.get(component, {}).get(flat_name(component or "", layer[len(prefix):]))
        if module is None:
            unknown.append(layer)
        else:
            found.setdefault(component, {})[module] = parts
    if unknown:
        raise UserError(f"LoRA {file}: its layer(s) {', '.join(sorted(unknown)[:3])} name no layer of this model; "
                        "it was made for another model. Apply it to the model it was trained on.")
    return found


def _check_tensors(file: Path, kind: str, layers: dict[str, dict]) -> None:
    """Tensors LyCORIS writes that peft's layers here have no place for (Tucker cores, DoRA-style scales, ...)."""
    extra = sorted({name for parts in layers.values() for name in parts if name not in (*KINDS[kind], "alpha")})
    if extra:
        raise UserError(f"LoRA {file} is a {TITLES[kind]} adapter with tensors this tool does not read ("
                        f"{', '.join(extra)}: LyCORIS' Tucker decomposition, weight decomposition or scalar); it reads "
                        f"plain {TITLES[kind]} layers ({', '.join(KINDS[kind])}, alpha).")


def _inject(part, config, state: dict, adapter_name: str, file: Path) -> None:
    """One component's layers under `adapter_name`, as diffusers' own loader puts an adapter in (the config where
    `get_list_adapters` finds it)."""
    from peft import inject_adapter_in_model, set_peft_model_state_dict

    if adapter_name in (getattr(part, "peft_config", None) or {}):
        raise UserError(f"LoRA {file}: the adapter name {adapter_name} is taken in this model.")
    inject_adapter_in_model(config, part, adapter_name=adapter_name)
    part.peft_config = {**(getattr(part, "peft_config", None) or {}), adapter_name: config}
    part._hf_peft_config_loaded = True
    result = set_peft_model_state_dict(part, state, adapter_name=adapter_name)
    wrong = list(getattr(result, "unexpected_keys", []) or []) + [
        k for k in getattr(result, "missing_keys", []) or [] if f".{adapter_name}" in k and
        any(t in k for t in ADAPTER_PARAMETERS)]
    if wrong:
        raise UserError(f"LoRA {file}: its tensors do not fit the layers peft built for them ({', '.join(wrong[:3])});"
                        " its factor shapes are not ones peft makes.")


def load_lycoris_adapter(pipe, file: Path, adapter_name: str) -> None:
    """A LoKr or LoHa file in LyCORIS' layout into the pipeline's UNet and text encoders as the adapter
    `adapter_name`, through peft (diffusers has no reader of it for these pipelines)."""
    tensors, _ = read_safetensors(file)
    kind = lycoris_kind(tensors)
    layers = layers_of(tensors)
    _check_tensors(file, kind, layers)
    make_config = _lokr_config if kind == "lokr" else _loha_config
    for component, modules in _by_module(pipe, file, layers).items():
        weights = {module: fold_scale(kind, parts) for module, parts in modules.items()}
        try:
            config = make_config(weights)
        except UserError as e:
            raise UserError(f"LoRA {file}: {e}.") from None
        state = {f"{module}.{name}": value for module, w in weights.items() for name, value in w.items()}
        part = getattr(pipe, component)
        _inject(part, config, {k: v.to(part.dtype) for k, v in state.items()}, adapter_name, file)
