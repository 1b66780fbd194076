"""The dose response's parameters, computed per batch from the batch's own perturbations."""

import pytest
import torch

from perturbx.module import DoseResponse

N_VOCAB, N_BITS = 40, 16


def _dose_response(kind: str, seed: int = 0) -> DoseResponse:
    generator = torch.Generator().manual_seed(seed)
    fingerprints = (torch.rand(N_VOCAB, N_BITS, generator=generator) > 0.5).float()
    has_structure = torch.arange(N_VOCAB) % 4 != 0  # indices 1, 5, 9, ... are genetic
    module = DoseResponse(kind, fingerprints, has_structure, n_hidden=8)
    with torch.no_grad():
        module.params.normal_(generator=generator)
    return module.eval()


def _expected(module: DoseResponse, index: torch.Tensor, extra: torch.Tensor | None):
    """Row-by-row reference: amortiser for molecules, learned table otherwise."""
    rows = []
    for i in index.flatten().tolist():
        if i > N_VOCAB:
            if extra is not None:
                query = extra[i - N_VOCAB - 1 : i - N_VOCAB]
                rows.append(module.amortizer(query)[0] + module._offset())
            else:
                pool = [
                    _expected(module, torch.tensor([j]), None)[0]
                    for j in range(1, N_VOCAB + 1)
                    if module.has_structure[j - 1]
                ]
                rows.append(torch.stack(pool).mean(0))
        elif i >= 1 and module.has_structure[i - 1]:
            rows.append(module.amortizer(module.fingerprints[i - 1 : i])[0] + module._offset())
        else:
            rows.append(module.params[i])
    return torch.stack(rows).reshape(*index.shape, -1)


def test_amortiser_sees_only_the_batch_molecules():
    module = _dose_response("amortized")
    seen_rows = []
    module.amortizer.register_forward_hook(lambda _m, inputs, _o: seen_rows.append(len(inputs[0])))
    index = torch.tensor([[2, 3], [2, 0], [3, 5], [2, 7]])  # 5 is genetic; 2, 3, 7 molecules
    with torch.no_grad():
        module.parameters_for(index)
    # Once, over the batch's 5 distinct entries (0, 2, 3, 5, 7; the non-molecules' outputs are
    # discarded), not over the 40-entry vocabulary.
    assert seen_rows == [5], "the amortiser must run once, over the batch's distinct entries"


@pytest.mark.parametrize("with_fingerprints", [True, False])
def test_parameters_match_the_row_by_row_definition(with_fingerprints):
    module = _dose_response("amortized")
    extra = (torch.rand(2, N_BITS, generator=torch.Generator().manual_seed(1)) > 0.5).float()
    index = torch.tensor([[1, 0], [5, N_VOCAB + 2], [8, N_VOCAB + 1], [5, 5]])
    given = extra if with_fingerprints else None
    with torch.no_grad():
        got = module.parameters_for(index, given)
        want = _expected(module, index, given)
    assert got.shape == (4, 2, 2)
    torch.testing.assert_close(got, want)


def test_learned_kinds_pool_the_molecules_for_an_unknown_one():
    module = _dose_response("logsigm")
    index = torch.tensor([[N_VOCAB + 1], [3]])
    with torch.no_grad():
        got = module.parameters_for(index)
    molecules = torch.arange(1, N_VOCAB + 1)[module.has_structure]
    torch.testing.assert_close(got[0, 0], module.params[molecules].mean(0))
    torch.testing.assert_close(got[1, 0], module.params[3])


def test_gradient_reaches_only_the_batch_rows():
    module = _dose_response("logsigm").train()
    scale = module(torch.tensor([[2], [6]]), torch.tensor([[1.0], [10.0]]))
    scale.sum().backward()
    touched = module.params.grad.abs().sum(1).nonzero().squeeze(-1).tolist()
    assert touched == [2, 6]
