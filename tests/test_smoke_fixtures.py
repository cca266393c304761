from simmerge_bandit.checkpoint import read_checkpoint


def test_tiny_models_are_readable(tiny_models):
    for name, path in tiny_models.items():
        ck = read_checkpoint(path)
        assert ck.n_params > 0 and ck.tensors, name
    sharded = read_checkpoint(tiny_models["ft_sharded"])
    assert len(sharded.files) > 1 and sharded.dtype == "bfloat16"
    assert "lm_head.weight" not in read_checkpoint(tiny_models["qwen2"]).tensors
