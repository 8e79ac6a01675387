"""The models behind the service: one pipeline per model folder, LoRA characters sharing their base's.

A LoRA character's adapters are loaded into its base's pipeline once, at start-up, under names of their own, and
switched per batch (`set_adapters` with the character's weights; `disable_lora` for a character without LoRAs), so
ten LoRA characters on one base hold one base in memory. Two LoRAs that bring the same new token (two characters
trained as `<sks>`) cannot share a tokenizer: the second gets its own copy of the base, with a note.

Prompts are measured with the slot's own copies of the pipeline's tokenizers (`TokenCounter`), never with the
pipeline's: a tokenizer call sets state that the next call reads, and the pipeline is the worker thread's alone.

A render request whose fragments all weigh 1.0 is drawn from its prompt text, exactly as `dreambooth generate`
draws that prompt; weighted fragments (an emotion's intensity) become weighted embeddings through compel, which
builds them from (text, weight) pairs.
"""

from __future__ import annotations

import copy
import hashlib
import io
import threading
from dataclasses import dataclass, field
from pathlib import Path

from dreambooth.characters.character import Character
from dreambooth.characters.compiler import RenderRequest, token_counter, token_limit
from dreambooth.errors import UserError
from dreambooth.formats.lora import find_lora_file, new_tokens, token_file_for
from dreambooth.formats.lora_fit import check_lora_fits
from dreambooth.formats.lora_loading import load_lora_adapter, text_sides
from dreambooth.generate import png_info
from dreambooth.models.base import config_folder, model_identity
from dreambooth.models.families import folder_family
from dreambooth.models.loading import load_pipeline, make_scheduler, pick_device, pick_dtype


class TokenCounter:
    """A prompt's tokens as a pipeline's tokenizers count them (the most of SDXL's two), on copies of its own.

    A transformers tokenizer keeps padding and truncation on its backend between calls, and every call sets them:
    counting with the pipeline's tokenizer (truncation off, no padding) from a request thread, while the worker thread
    was between setting them and encoding, gave the worker's negative prompt 2 tokens against the prompt's 77, and
    torch.cat failed ("Expected size 2 but got size 77"; ~2% of renders under /v1/compile + /v1/render load). The
    copies are shared by the request threads (sync endpoints run in a thread pool), so calls take turns."""

    def __init__(self, tokenizers: list):
        self.tokenizers = [copy.deepcopy(tokenizer) for tokenizer in tokenizers]
        self.counters = [token_counter(tokenizer) for tokenizer in self.tokenizers]
        self.limit = min(token_limit(tokenizer) for tokenizer in self.tokenizers)
        self._lock = threading.Lock()

    def __call__(self, text: str) -> int:
        with self._lock:
            return max(count(text) for count in self.counters)


@dataclass
class Slot:
    """A pipeline and what is loaded into it; the pipeline, its schedulers and compel are the worker thread's."""

    pipe: object
    model: str
    tokens: set[str] = field(default_factory=set)
    adapters: bool = False
    schedulers: dict = field(default_factory=dict)
    compel: object = None
    counter: TokenCounter | None = None  # the request threads' tokenizers, copied once every LoRA is loaded


@dataclass
class Drawn:
    character: Character
    slot: Slot
    adapters: list[str]
    weights: list[float]
    model_hash: str


def _file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def character_model_hash(character: Character) -> str:
    """What the character's pictures depend on: the model's identity (its weight files' headers, first MiB and
    sizes, and their modification times, so that a model saved again is a new model) and the LoRA files' contents."""
    digest = hashlib.sha256(model_identity(character.model).encode())
    folder = Path(character.model)
    for file in sorted(folder.glob("*/*.safetensors")) if folder.is_dir() else []:
        digest.update(f"{file.relative_to(folder)}:{file.stat().st_mtime_ns}".encode())
    for lora in character.loras:
        file = find_lora_file(lora.file)
        digest.update(f"{_file_hash(file)}:{lora.weight!r}".encode())
        tokens = token_file_for(file)  # beside the LoRA, named after it unless it has diffusers' fixed name
        if tokens.is_file():
            digest.update(_file_hash(tokens).encode())
    return digest.hexdigest()[:16]


class Renderer:
    """Loads every character's model once; `render` draws a batch of requests for one character and size."""

    def __init__(self, characters: dict[str, Character], *, device: str | None = None, precision: str | None = None):
        self.device = pick_device(device)
        self.dtype = pick_dtype(precision, self.device)
        self.slots: list[Slot] = []
        self.drawn: dict[str, Drawn] = {}
        self.calls = 0  # pipeline calls, for tests and metrics
        self._lock = threading.Lock()
        for character in characters.values():  # every LoRA made for another model, before any model loads
            for lora in character.loras:
                check_lora_fits(find_lora_file(lora.file), character.model, f"character {character.name}'s model:")
        for character in characters.values():
            self.drawn[character.name] = self._place(character)
        for slot in self.slots:  # after the LoRAs, whose new tokens the copies must know
            slot.counter = TokenCounter([tokenizer for _, tokenizer, _ in text_sides(slot.pipe)])
        self._problems = {name: self._prepare_scheduler(drawn) for name, drawn in self.drawn.items()}

    # ------------------------------------------------------------------------------------------------ loading
    def _new_slot(self, model: str) -> Slot:
        pipe = load_pipeline(model, device=self.device, dtype=self.dtype)
        slot = Slot(pipe=pipe, model=model, tokens=set(pipe.tokenizer.get_vocab()))
        slot.schedulers["__base__"] = dict(pipe.scheduler.config)
        self.slots.append(slot)
        return slot

    def _place(self, character: Character) -> Drawn:
        files = [find_lora_file(lora.file) for lora in character.loras]
        wanted = {token for file in files for token in new_tokens(file)}
        slot = next((s for s in self.slots if s.model == character.model and not (wanted & s.tokens)), None)
        if slot is None:
            if any(s.model == character.model for s in self.slots):
                print(f"note: character {character.name}'s LoRA brings token(s) {', '.join(sorted(wanted))} that "
                      f"another character's LoRA on {character.model} brings too; it gets its own copy of the model.")
            slot = self._new_slot(character.model)
        names = []
        for i, lora in enumerate(character.loras):
            name = f"{character.name.replace('-', '_')}_{i}"
            load_lora_adapter(slot.pipe, lora.file, name, model=character.model,
                              flag=f"character {character.name}'s model:")
            names.append(name)
        slot.tokens |= wanted
        slot.adapters = slot.adapters or bool(names)
        return Drawn(character, slot, names, [lora.weight for lora in character.loras],
                     character_model_hash(character))

    def _prepare_scheduler(self, drawn: Drawn) -> list[str]:
        """The character's sampler, built now rather than on its first draw: a class name diffusers lacks passes the
        characters file's check (it ends in Scheduler) and failed every render with a 500."""
        name, slot = drawn.character.scheduler, drawn.slot
        try:
            if name not in slot.schedulers:
                slot.schedulers[name] = make_scheduler(name, slot.schedulers["__base__"])
        except UserError as e:
            return [f"its scheduler: {e}"]
        return []

    def unusable(self, name: str) -> list[str]:
        """What loading found that the character cannot be drawn with (empty when it can)."""
        return self._problems[name]

    # ------------------------------------------------------------------------------------------------ drawing
    def count_tokens(self, name: str) -> TokenCounter:
        """The counter of the character's prompts, for any thread but the worker (whose pipeline it never touches)."""
        return self.drawn[name].slot.counter

    def max_tokens(self, name: str) -> int:
        return self.drawn[name].slot.counter.limit

    def model_hash(self, name: str) -> str:
        return self.drawn[name].model_hash

    def model_family(self, name: str) -> tuple[str, int]:
        """The family of the character's model, as models.base reads it from the model's config files, and the side
        its UNet was made for, in pixels (SD 1.x 512, SD 2.x 768 or 512, SDXL 1024)."""
        drawn = self.drawn[name]
        pipe = drawn.slot.pipe
        folder = config_folder(drawn.character.model)
        family = folder_family(folder) if folder is not None else None
        return family.title if family else "of a family this tool does not know", \
            int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)

    def _activate(self, drawn: Drawn, scheduler: str) -> None:
        slot, pipe = drawn.slot, drawn.slot.pipe
        if slot.adapters:
            if drawn.adapters:
                pipe.enable_lora()
                pipe.set_adapters(drawn.adapters, adapter_weights=drawn.weights)
            else:
                pipe.disable_lora()
        if scheduler not in slot.schedulers:
            slot.schedulers[scheduler] = make_scheduler(scheduler, slot.schedulers["__base__"])
        pipe.scheduler = slot.schedulers[scheduler]

    def _weighted_embeddings(self, slot: Slot, request: RenderRequest):
        """The prompt's embedding with each fragment at its weight (compel), and for SDXL the pooled embedding of the
        plain prompt; the text is the prompt's own, split where the compiler joined it, so that weights of 1.0 would
        give the plain prompt's tokens."""
        from compel import Compel, ReturnedEmbeddingsType
        from compel.prompt_parser import FlattenedPrompt

        PENULTIMATE = ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED  # noqa: N806

        pipe = slot.pipe
        sides = text_sides(pipe)
        sdxl = len(sides) > 1
        if slot.compel is None and sdxl:
            # SDXL conditions on both encoders' penultimate hidden states side by side, and on the second's pooled
            # output, as its pipeline's encode_prompt builds them
            slot.compel = Compel(tokenizer=[tokenizer for _, tokenizer, _ in sides],
                                 text_encoder=[encoder for *_, encoder in sides],
                                 returned_embeddings_type=PENULTIMATE,
                                 requires_pooled=[False, True], truncate_long_prompts=True, device=str(self.device))
        elif slot.compel is None:
            slot.compel = Compel(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder,
                                 truncate_long_prompts=True, device=str(self.device))
        parts = [(part["text"] if i == 0 else request.joiner + part["text"], float(part["weight"]))
                 for i, part in enumerate(request.fragments)]
        (conditioning, _), _ = slot.compel.build_conditioning_tensor_for_prompt_object(FlattenedPrompt(parts))
        if not sdxl:
            return conditioning, None
        pooled = slot.compel.conditioning_provider.get_pooled_embeddings([request.prompt], device=str(self.device))
        return conditioning, pooled

    def _weighted_call(self, pipe, requests: list[RenderRequest], slot: Slot) -> dict:
        """The pipeline's embedding arguments for a batch with weighted fragments; the negative prompts as usual."""
        import torch

        pairs = [self._weighted_embeddings(slot, r) for r in requests]
        first = requests[0]
        encoded = pipe.encode_prompt(prompt=[r.prompt for r in requests], device=pipe.device, num_images_per_prompt=1,
                                     do_classifier_free_guidance=first.guidance > 1.0,
                                     negative_prompt=[r.negative_prompt for r in requests])
        embeds = {"prompt_embeds": torch.cat([c for c, _ in pairs]).to(pipe.dtype),
                  "negative_prompt_embeds": encoded[1]}
        if pairs[0][1] is not None:  # SDXL: (embeds, negative, pooled, negative pooled)
            embeds.update(pooled_prompt_embeds=torch.cat([p for _, p in pairs]).to(pipe.dtype),
                          negative_pooled_prompt_embeds=encoded[3])
        return embeds

    def render(self, requests: list[RenderRequest]) -> list[bytes]:
        """PNGs of a batch of requests that share character, size, steps, guidance and sampler; one pipeline call."""
        import torch

        first = requests[0]
        drawn = self.drawn[first.character]
        pipe = drawn.slot.pipe
        generators = [torch.Generator(device=pipe.device).manual_seed(r.seed) for r in requests]
        shared = dict(num_inference_steps=first.steps, guidance_scale=first.guidance, height=first.height,
                      width=first.width, generator=generators)
        with self._lock, torch.inference_mode():
            self._activate(drawn, first.scheduler)
            if any(part["weight"] != 1.0 for r in requests for part in r.fragments):
                out = pipe(**self._weighted_call(pipe, requests, drawn.slot), **shared)
            else:
                out = pipe(prompt=[r.prompt for r in requests], negative_prompt=[r.negative_prompt for r in requests],
                           **shared)
            self.calls += 1
        return [self._png(image, request, drawn) for image, request in zip(out.images, requests)]

    @staticmethod
    def _png(image, request: RenderRequest, drawn: Drawn) -> bytes:
        """The picture with how it was made (A1111's `parameters` and our JSON); the model by character and hash,
        not by the server's paths."""
        meta = {"prompt": request.prompt, "negative_prompt": request.negative_prompt, "seed": request.seed,
                "steps": request.steps, "guidance": request.guidance, "scheduler": request.scheduler,
                "width": image.width, "height": image.height, "character": request.character,
                "fragments": request.fragments}
        loras = [[Path(lora.file).name, lora.weight] for lora in drawn.character.loras]
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", pnginfo=png_info(meta, f"{request.character} ({drawn.model_hash})", loras))
        return buffer.getvalue()
