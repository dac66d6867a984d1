"""Writing surgeon's factors in other libraries' formats (PEFT)."""
