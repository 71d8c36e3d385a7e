"""Yu & Ananiadou 2024, "Neuron-level knowledge attribution in large language models" (``methods.md`` Y&A)."""
