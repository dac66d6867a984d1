"""Writing surgeon's factors in other libraries' formats: a PEFT LoRA of the original model (peft.py,
PiSSA→LoRA conversion) and PEFT's KaSA (kasa.py). Part of the commands layer."""
