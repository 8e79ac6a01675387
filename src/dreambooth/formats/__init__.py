"""What the tool writes and reads back: `atomic` (the one writer, every save goes through it), the LoRA file
(`lora`) and loading LoRAs into a pipeline (`lora_loading`), and the exports (`kohya`, `single_file`, `merge`)."""
