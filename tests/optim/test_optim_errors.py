"""Bad input to optimizers: clear errors, nothing half-applied."""

import numpy as np
import pytest

import handgrad as hg
from handgrad import nn
from handgrad.nn import Parameter
from handgrad.optim import SGD, AdamW, param_groups_for_weight_decay


def test_empty_parameter_list():
    with pytest.raises(ValueError, match="empty parameter list"):
        AdamW([])
    with pytest.raises(ValueError, match="empty parameter list"):
        SGD(iter([]), lr=0.1)
    with pytest.raises(ValueError, match="empty parameter list"):
        AdamW([{"params": []}])


def test_non_tensor_and_frozen_parameters():
    with pytest.raises(TypeError, match="parameter 1 of group 0 is a ndarray"):
        AdamW([Parameter(hg.zeros(2)), np.zeros(2)])
    with pytest.raises(ValueError, match="does not require grad"):
        SGD([hg.zeros(2)], lr=0.1)
    with pytest.raises(TypeError, match="single Parameter"):
        AdamW(Parameter(hg.zeros(2)))
    x = Parameter(hg.zeros(2))
    with pytest.raises(ValueError, match="not a leaf"):
        AdamW([x * 2])
    with pytest.raises(ValueError, match="more than one group"):
        AdamW([{"params": [x]}, {"params": [x]}])
    with pytest.raises(TypeError, match="mixes dicts and Tensors"):
        AdamW([x, {"params": [Parameter(hg.zeros(1))]}])


def test_unknown_and_invalid_options():
    p = Parameter(hg.zeros(2))
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['momentum'\].*valid options"):
        AdamW([{"params": [p], "momentum": 0.9}])
    with pytest.raises(TypeError):
        AdamW([p], momentum=0.9)  # not an AdamW argument at all
    with pytest.raises(ValueError, match="invalid beta parameter at index 1"):
        AdamW([p], betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="invalid lr"):
        AdamW([p], lr=-1.0)
    with pytest.raises(ValueError, match="invalid weight_decay"):
        SGD([p], lr=0.1, weight_decay=-0.1)
    with pytest.raises(ValueError, match="Nesterov"):
        SGD([p], lr=0.1, nesterov=True)


def test_load_state_dict_rejects_mismatches_without_changing_anything():
    ps = [Parameter(hg.zeros(3)), Parameter(hg.zeros(2, 2))]
    opt = AdamW(ps, lr=0.1)
    for p in ps:
        p.grad = hg.ones(p.shape)
    opt.step()
    good = opt.state_dict()

    other = AdamW([Parameter(hg.zeros(3)), Parameter(hg.zeros(2, 3))], lr=0.7)
    with pytest.raises(ValueError, match=r"state\[1\]\['exp_avg'\] has shape \(2, 2\).*\(2, 3\)"):
        other.load_state_dict(good)
    assert other.state == {} and other.param_groups[0]["lr"] == 0.7

    with pytest.raises(ValueError, match="1 parameter groups, this optimizer has 2"):
        AdamW([{"params": ps[:1]}, {"params": ps[1:]}]).load_state_dict(good)
    with pytest.raises(ValueError, match="group 0 has 2 parameters in the state dict but 1"):
        AdamW(ps[:1]).load_state_dict(good)
    with pytest.raises(ValueError, match="keys 'state' and 'param_groups'"):
        opt.load_state_dict({"state": {}})
    with pytest.raises(ValueError, match="'param_groups' must be a list of dicts"):
        opt.load_state_dict({"state": {}, "param_groups": [{"lr": 0.1}]})
    with pytest.raises(ValueError, match="state for parameter 0 is a list"):
        opt.load_state_dict({"state": {0: []}, "param_groups": good["param_groups"]})
    bad = {"state": {5: {"step": 1}}, "param_groups": good["param_groups"]}
    with pytest.raises(ValueError, match="state for parameter 5, but there are only 2"):
        opt.load_state_dict(bad)
    bad = {"state": {}, "param_groups": [dict(good["param_groups"][0], amsgrad=True)]}
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['amsgrad'\]"):
        opt.load_state_dict(bad)


def test_param_groups_for_weight_decay():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = nn.Embedding(10, 4)
            self.ln = nn.LayerNorm(4)
            self.fc = nn.Linear(4, 4)
            self.head = nn.Linear(4, 10, bias=False)
            self.head.weight = self.wte.weight  # tied, as GPT-2

    model = Tiny()
    decay, no_decay = param_groups_for_weight_decay(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    ids = lambda ps: [id(p) for p in ps]  # noqa: E731
    assert ids(decay["params"]) == ids([model.wte.weight, model.fc.weight])
    assert ids(no_decay["params"]) == ids([model.ln.weight, model.ln.bias, model.fc.bias])
    AdamW([decay, no_decay], lr=1e-3)  # usable as is (the tied weight appears once)
