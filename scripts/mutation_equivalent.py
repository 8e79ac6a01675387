"""Surviving mutants judged equivalent or harmless, with the reason: read by scripts/mutation_report.py.

A survivor listed here still appears in docs/results/mutation.md with its reason, but leaves the denominator of
the "non-equivalent killed" score. Keys are mutmut's mutant names (`mutmut results --all true`); mutmut numbers
the mutants of a function in order, so an edit to that function can renumber them: the report flags entries
that no longer name a survivor.
"""

EQUIVALENT: dict[str, str] = {
    "dreambooth.training.checkpoint.xǁCheckpointFilesǁ_load_lora__mutmut_35":
        "drops adapter_name='default' from set_peft_model_state_dict, whose default adapter name is 'default'",
    "dreambooth.training.images.x__not_an_image_reason__mutmut_25":
        "'utf-8' -> 'UTF-8': Python's codec names are case-insensitive",
    "dreambooth.formats.lora.x__to_peft_names__mutmut_2":
        "the early return only skips diffusers' conversion, which leaves keys already in peft's spelling as they are",
    "dreambooth.formats.lora.x__to_peft_names__mutmut_9":
        "the early return only skips diffusers' conversion, which leaves keys already in peft's spelling as they are",
    "dreambooth.formats.lora.x__to_peft_names__mutmut_4":
        "the early return only skips diffusers' conversion, which leaves keys already in peft's spelling as they are",
    "dreambooth.formats.lora.x__to_peft_names__mutmut_3":
        "the early return only skips diffusers' conversion, which leaves keys already in peft's spelling as they are",
    "dreambooth.formats.lora.x__to_peft_names__mutmut_8":
        "the early return only skips diffusers' conversion, which leaves keys already in peft's spelling as they are",
    "dreambooth.training.images.x__not_an_image_reason__mutmut_17":
        "one byte more of the file's head: the head only words the message for a file that is no image (text or "
        "not), and a single byte changes it only for a file whose first multi-byte character straddles byte 1024",
    "dreambooth.training.checkpoint.xǁCheckpointFilesǁ_load_token_rows__mutmut_13":
        "drops the dtype of .to(): assigning into the embedding's rows casts to its dtype anyway",
    "dreambooth.training.images.x__high_depth_to_l__mutmut_2":
        "astype(None) is astype(float64) in numpy (the first astype; the last one's mutant is killed by the mode)",
    "dreambooth.training.checkpoint.xǁCheckpointFilesǁ_load_token_rows__mutmut_15":
        "drops the dtype of .to(): assigning into the embedding's rows casts to its dtype anyway",
}
