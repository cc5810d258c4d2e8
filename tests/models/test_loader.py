

def test_one_rope_table_per_model(checkpoint_factory):
    """Every attention layer shares the model's RoPE table (not one copy per layer), placed with the weights."""
    import torch

    from packserve.layers.rotary import RotaryEmbedding
    from packserve.models.loader import load_model

    model = load_model(checkpoint_factory("llama"), torch.device("cpu"), torch.float32, 256)
    tables = {id(m) for m in model.modules() if isinstance(m, RotaryEmbedding)}
    layers = [layer.self_attn.rotary for layer in model.model.layers]
    assert len(tables) == 1 and len(layers) > 1 and all(r is layers[0] for r in layers)
    assert layers[0].cos.device.type == "cpu" and layers[0].cos.shape[0] == 256
