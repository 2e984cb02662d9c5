"""Every invalid model configuration raises ConfigError with one line naming the bad value."""

import pytest

from deepnorm import ConfigError, TransformerConfig

VALID = dict(arch="decoder", num_layers=2, d_model=16, num_heads=2, d_ff=32, vocab_size=30)
ENC_DEC = dict(VALID, arch="encoder_decoder", num_layers=0, num_encoder_layers=2,
               num_decoder_layers=2)

# (id, config overrides, regex the message must match: the bad value and what is allowed)
BAD = [
    ("unknown_arch", dict(arch="gpt"), r"model\.arch='gpt'.*encoder, decoder, encoder_decoder"),
    ("unknown_norm", dict(norm="groupnorm"),
     r"model\.norm='groupnorm'.*layernorm, rmsnorm, scalenorm, dyt, unitnorm, none, batchnorm, "
     r"powernorm"),
    ("norm_momentum_out_of_range", dict(norm="batchnorm", norm_momentum=1.0),
     r"model\.norm_momentum=1\.0 must be a number in \[0, 1\)"),
    ("norm_warmup_negative", dict(norm="powernorm", norm_warmup=-1),
     r"model\.norm_warmup=-1 must be a non-negative integer"),
    ("norm_warmup_without_powernorm", dict(norm="batchnorm", norm_warmup=10),
     r"model\.norm_warmup=10 is PowerNorm's; model\.norm='batchnorm' has no warmup"),
    ("unknown_residual", dict(residual="highway"),
     r"model\.residual='highway'.*post, pre, sandwich, peri, deepnorm, subln, b2t, rezero, "
     r"admin, mixln, lnscale"),
    ("unknown_init", dict(init="kaiming"),
     r"model\.init='kaiming'.*auto, xavier, deepnorm, subln, tfixup, dsinit"),
    ("unknown_remat", dict(remat_policy="some"), r"model\.remat_policy='some'.*none, full"),
    ("unknown_activation", dict(activation="swish"), r"model\.activation='swish'.*gelu, relu"),
    ("unknown_positions", dict(positions="rope"), r"model\.positions='rope'.*sinusoidal"),
    ("unknown_dtype", dict(dtype="float64"), r"model\.dtype='float64'.*float32, bfloat16, float16"),
    ("unknown_attention_impl", dict(attention_impl="flash"), r"attention_impl='flash'"),
    ("cudnn_in_float32", dict(attention_impl="cudnn"),
     r"model\.attention_impl='cudnn' needs model\.dtype in bfloat16, float16 .*"
     r"got model\.dtype='float32'"),
    ("heads_do_not_divide", dict(d_model=18, num_heads=4),
     r"model\.d_model=18 is not divisible by model\.num_heads=4"),
    ("zero_d_model", dict(d_model=0), r"model\.d_model=0 must be a positive integer"),
    ("negative_heads", dict(num_heads=-2), r"model\.num_heads=-2 must be a positive integer"),
    ("zero_d_ff", dict(d_ff=0), r"model\.d_ff=0 must be a positive integer"),
    ("zero_vocab", dict(vocab_size=0), r"model\.vocab_size=0 must be a positive integer"),
    ("float_d_model", dict(d_model=16.0), r"model\.d_model=16\.0 must be a positive integer"),
    ("zero_max_len", dict(max_len=0), r"model\.max_len=0 must be a positive integer"),
    ("zero_scan_unroll", dict(scan_unroll=0),
     r"model\.scan_unroll=0 must be a positive integer"),
    ("unroll_without_scan", dict(scan_unroll=2, scan_layers=False),
     r"model\.scan_unroll=2 needs model\.scan_layers=True"),
    ("zero_layers", dict(num_layers=0), r"model\.num_layers=0 must be a positive integer"),
    ("negative_layers", dict(num_layers=-1), r"model\.num_layers=-1 must be a positive integer"),
    ("decoder_given_encoder_layers", dict(num_encoder_layers=6),
     r"model\.num_encoder_layers=6 is not used by arch='decoder'"),
    ("encoder_given_decoder_layers", dict(arch="encoder", num_decoder_layers=6),
     r"model\.num_decoder_layers=6 is not used by arch='encoder'"),
    ("mixln_fraction_above_one", dict(residual="mixln", mixln_fraction=1.5),
     r"model\.mixln_fraction=1\.5 must be in \[0, 1\]"),
    ("mixln_fraction_negative", dict(residual="mixln", mixln_fraction=-0.1),
     r"model\.mixln_fraction=-0\.1 must be in \[0, 1\]"),
    ("dropout_one", dict(dropout_rate=1.0), r"model\.dropout_rate=1\.0 must be in \[0, 1\)"),
    ("zero_eps", dict(norm_eps=0.0), r"model\.norm_eps=0\.0 must be positive"),
    ("rezero_with_norm", dict(residual="rezero", norm="layernorm"),
     r"residual='rezero'.*model\.norm='layernorm'"),
    ("no_norm_with_pre", dict(residual="pre", norm="none"), r"model\.norm='none'.*'pre'"),
    ("no_norm_with_deepnorm", dict(residual="deepnorm", norm="none"),
     r"model\.norm='none'.*'deepnorm'"),
    ("fixup_with_norm", dict(residual="fixup", norm="rmsnorm"),
     r"model\.residual='fixup' uses no normalization but model\.norm='rmsnorm'; set "
     r"model\.norm='none'"),
    ("no_norm_with_normformer", dict(residual="normformer", norm="none"),
     r"model\.norm='none' only makes sense with residual post, rezero, fixup, ngpt .*'normformer'"),
    ("skip_lambda_zero", dict(residual="rescaled", skip_lambda=0.0),
     r"model\.skip_lambda=0\.0 must be positive"),
    ("skip_lambda_text", dict(skip_lambda="2"), r"model\.skip_lambda='2' must be a number"),
    ("qk_norm_not_bool", dict(qk_norm="yes"), r"model\.qk_norm='yes' must be True or False"),
]

BAD_ENC_DEC = [
    ("enc_dec_given_num_layers", dict(num_layers=4),
     r"model\.num_layers=4 is not used by arch='encoder_decoder'"),
    ("enc_dec_without_encoder", dict(num_encoder_layers=0),
     r"model\.num_encoder_layers=0 must be a positive integer"),
    ("enc_dec_without_decoder", dict(num_decoder_layers=0),
     r"model\.num_decoder_layers=0 must be a positive integer"),
]


@pytest.mark.parametrize("overrides,message", [(o, m) for _, o, m in BAD],
                         ids=[i for i, _, _ in BAD])
def test_bad_config_raises_config_error_naming_the_value(overrides, message):
    with pytest.raises(ConfigError, match=message) as info:
        TransformerConfig(**dict(VALID, **overrides))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("overrides,message", [(o, m) for _, o, m in BAD_ENC_DEC],
                         ids=[i for i, _, _ in BAD_ENC_DEC])
def test_bad_encoder_decoder_layer_counts(overrides, message):
    with pytest.raises(ConfigError, match=message):
        TransformerConfig(**dict(ENC_DEC, **overrides))


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_from_mapping_names_unknown_keys():
    with pytest.raises(ConfigError, match="unknown model config key.*num_layer\\b.*known keys"):
        TransformerConfig.from_mapping(dict(VALID, num_layer=3))
    assert TransformerConfig.from_mapping(VALID) == TransformerConfig(**VALID)


@pytest.mark.parametrize("overrides", [
    dict(residual="rezero", norm="none"), dict(residual="post", norm="none", init="tfixup"),
    dict(residual="mixln", mixln_fraction=0.0), dict(residual="mixln", mixln_fraction=1.0),
    dict(arch="encoder", norm="dyt"), dict(dtype="bfloat16", remat_policy="save_dots"),
    dict(attention_impl="cudnn", dtype="bfloat16"),
    dict(residual="fixup", norm="none"), dict(residual="post", norm="none", init="fixup"),
    dict(residual="deepscale", qk_norm=True), dict(residual="rescaled", skip_lambda=1),
])
def test_valid_edge_cases_are_accepted(overrides):
    TransformerConfig(**dict(VALID, **overrides))


def test_derived_layer_counts():
    cfg = TransformerConfig(**ENC_DEC)
    assert (cfg.encoder_layers, cfg.decoder_layers, cfg.total_layers) == (2, 2, 4)
    cfg = TransformerConfig(**dict(VALID, arch="encoder", num_layers=5))
    assert (cfg.encoder_layers, cfg.decoder_layers, cfg.head_dim) == (5, 0, 8)


@pytest.mark.parametrize("residual,init", [
    ("deepnorm", "deepnorm"), ("subln", "subln"), ("fixup", "fixup"), ("normformer", "xavier"),
    ("layerscale", "xavier"), ("deepscale", "xavier"), ("rescaled", "xavier")])
def test_auto_init_is_the_scheme_s_declared_init(residual, init):
    norm = "none" if residual == "fixup" else "layernorm"
    assert TransformerConfig(**dict(VALID, residual=residual, norm=norm)).resolved_init == init
