"""The zoo: tiny models built from configs under a seed (models, transformers_zoo), their inputs and targets, the
other methods' facts the suite draws from (methods) and the QLoRA bases through bitsandbytes (quantized)."""
