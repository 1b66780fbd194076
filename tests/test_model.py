"""PerturbX model API: outputs, prediction, save/load, determinism, sparse input."""

import tracemalloc

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import sparse

from _toy import SMALL_ARCH, TOY_SMILES, setup_toy, toy_screen
from perturbx import PerturbX


@pytest.fixture(scope="module")
def trained():
    adata = toy_screen()
    setup_toy(adata)
    model = PerturbX(adata, **SMALL_ARCH)
    model.train(max_epochs=2, batch_size=64, seed=0, enable_progress_bar=False)
    return model, adata


def test_history_logs_loss_components(trained):
    model, _ = trained
    for key in (
        "reconstruction_loss_train",
        "reconstruction_loss_validation",
        "adversary_loss_train",
        "adversary_confusion_train",
        "adversary_confusion_validation",
        "adversary_accuracy_perturbation_train",
        "adversary_accuracy_cell_type_train",
    ):
        assert key in model.history, key
        assert len(model.history[key]) == 2
    # A KL divergence: never negative.
    assert (model.history["adversary_confusion_train"].to_numpy(dtype=float) >= 0).all()


def test_latent_shapes(trained):
    model, adata = trained
    basal = model.get_latent_representation()
    full = model.get_latent_representation(kind="full")
    assert basal.shape == full.shape == (adata.n_obs, SMALL_ARCH["n_latent"])
    controls = adata.obs["drug"].to_numpy() == "control"
    treated = ~controls
    # Full = basal + embeddings: controls differ only by the covariate embedding, treated more.
    assert not np.allclose(basal[treated], full[treated])


def test_predict_returns_annotated_anndata(trained):
    model, adata = trained
    pred = model.predict(
        target=[
            {"drug": "aspirin", "dose": 3.0},
            {"drug": "aspirin+caffeine", "dose": "1+10", "cell_type": "b"},
        ],
        n_cells_per_target=20,
    )
    assert isinstance(pred, ad.AnnData)
    assert pred.n_vars == adata.n_vars and list(pred.var_names) == list(adata.var_names)
    assert pred.n_obs == 40
    assert set(pred.obs["drug"]) == {"aspirin", "aspirin+caffeine"}
    combo = pred.obs["drug"] == "aspirin+caffeine"
    assert set(pred.obs.loc[combo, "dose"]) == {"1.0+10.0"}
    assert set(pred.obs.loc[combo, "cell_type"]) == {"b"}
    sources = pred.obs["source_cell"].astype(str)
    assert set(adata.obs.loc[sources, "drug"]) == {"control"}
    # covariate restriction: the combination was predicted from controls of cell type b
    assert set(adata.obs.loc[sources[combo.to_numpy()], "cell_type"]) == {"b"}
    assert np.all(np.asarray(pred.X) >= 0)


@pytest.mark.parametrize(
    "target",
    [
        # pandas 3 reads text columns as its ``str`` dtype, whose missing value is NaN
        pd.DataFrame({"drug": pd.array(["aspirin", "caffeine"], dtype="string")}),
        pd.DataFrame({"drug": ["aspirin", "caffeine"], "cell_type": [np.nan, "b"]}),
        pd.DataFrame(
            {"drug": ["aspirin", "caffeine"], "cell_type": pd.array([pd.NA, "b"], dtype="string")}
        ),
        [{"drug": "aspirin"}, {"drug": "caffeine", "cell_type": "b"}],
    ],
    ids=["string dtype, no covariate", "NaN covariate", "pd.NA covariate", "dicts"],
)
def test_target_without_covariate_keeps_the_source_cells_covariate(trained, target):
    model, adata = trained
    pred = model.predict(target=target, n_cells_per_target=30, seed=0)
    aspirin = (pred.obs["drug"] == "aspirin").to_numpy()
    sources = pred.obs["source_cell"].astype(str).to_numpy()
    # each predicted cell keeps its source cell's own cell type, which both types supply
    np.testing.assert_array_equal(
        pred.obs["cell_type"].astype(str).to_numpy()[aspirin],
        adata.obs.loc[sources[aspirin], "cell_type"].astype(str).to_numpy(),
    )
    assert set(pred.obs.loc[aspirin, "cell_type"]) == {"a", "b"}
    caffeine_types = (
        {"a", "b"}
        if "cell_type"
        not in pd.DataFrame(list(target) if isinstance(target, list) else target).columns
        else {"b"}
    )
    assert set(pred.obs.loc[~aspirin, "cell_type"]) == caffeine_types
    assert isinstance(pred.obs["drug"].dtype, pd.CategoricalDtype)
    assert isinstance(pred.obs["cell_type"].dtype, pd.CategoricalDtype)


def test_predict_differs_by_dose_and_order_pairing(trained):
    model, _ = trained
    kw = dict(n_cells_per_target=30, seed=1)
    ab = model.predict(target={"drug": "aspirin+caffeine", "dose": "1+10"}, **kw).X
    ba_same = model.predict(target={"drug": "caffeine+aspirin", "dose": "10+1"}, **kw).X
    ba_swapped = model.predict(target={"drug": "caffeine+aspirin", "dose": "1+10"}, **kw).X
    np.testing.assert_allclose(ab, ba_same, rtol=1e-5, atol=1e-6)
    assert not np.allclose(ab, ba_swapped)


def test_unknown_target_names_known_ones(trained):
    model, _ = trained
    with pytest.raises(ValueError, match="aspirinn.*did you mean 'aspirin'"):
        model.predict(target="aspirinn")
    with pytest.raises(ValueError, match="cell_type.*'c'"):
        model.predict(target={"drug": "aspirin", "cell_type": "c"})


def test_unseen_molecule_by_smiles(trained):
    model, _ = trained
    kw = dict(n_cells_per_target=25, seed=0)
    ibuprofen = model.predict(target="CC(C)Cc1ccc(cc1)C(C)C(=O)O", **kw)
    paracetamol = model.predict(
        target={"drug": "paracetamol", "smiles": "CC(=O)Nc1ccc(O)cc1"}, **kw
    )
    assert not np.allclose(ibuprofen.X, paracetamol.X)
    sim = paracetamol.obs["max_tanimoto_to_training"].iloc[0]
    assert 0 <= sim < 1
    assert paracetamol.obs["nearest_training_drug"].iloc[0] in TOY_SMILES
    # A known molecule given by SMILES maps to its vocabulary entry.
    by_name = model.predict(target="aspirin", **kw).X
    by_smiles = model.predict(target={"drug": "x", "smiles": "O=C(O)c1ccccc1OC(C)=O"}, **kw).X
    np.testing.assert_allclose(by_name, by_smiles, rtol=1e-5)
    assert model.perturbations == sorted(["KLF1", "aspirin", "caffeine"])  # registry unchanged


def test_embeddings_and_dose_response(trained):
    model, _ = trained
    emb = model.get_perturbation_embeddings()
    assert emb.shape == (3, SMALL_ARCH["n_latent"]) and list(emb.index) == model.perturbations
    scaled = model.get_perturbation_embeddings(doses=2.0)
    curve = model.get_dose_response("aspirin", [0.0, 2.0, 10.0])
    np.testing.assert_allclose(scaled.loc["aspirin"], emb.loc["aspirin"] * curve[1], rtol=1e-5)
    new = model.get_perturbation_embeddings(["CCO", "CCN"])
    assert not np.allclose(new.iloc[0], new.iloc[1])
    assert model.get_dose_response("CCO", [0.1, 1, 10]).shape == (3,)


def test_reconstruct_is_separate_from_predict(trained):
    model, adata = trained
    rec = model.reconstruct(indices=np.arange(10))
    assert rec.shape == (10, adata.n_vars)
    assert list(rec.obs["drug"]) == list(adata.obs["drug"].iloc[:10])


def test_save_load_round_trip(trained, tmp_path):
    model, adata = trained
    target = [{"drug": "caffeine", "dose": 3.0}, {"drug": "CCO"}]
    before = model.predict(target=target, n_cells_per_target=15)
    model.save(tmp_path / "m", overwrite=True)
    loaded = PerturbX.load(tmp_path / "m", adata=adata)
    after = loaded.predict(target=target, n_cells_per_target=15)
    np.testing.assert_array_equal(before.X, after.X)
    assert loaded.perturbations == model.perturbations
    assert loaded.perturbation_registry == model.perturbation_registry
    pd.testing.assert_frame_equal(
        loaded.history["reconstruction_loss_train"], model.history["reconstruction_loss_train"]
    )
    np.testing.assert_array_equal(loaded.train_indices, model.train_indices)


def test_same_seed_same_model():
    import scvi

    preds = []
    for _ in range(2):
        scvi.settings.seed = 3  # seeds the weight initialisation
        adata = toy_screen()
        setup_toy(adata)
        model = PerturbX(adata, **SMALL_ARCH)
        model.train(max_epochs=1, batch_size=64, seed=3, enable_progress_bar=False)
        preds.append(model.predict(target="caffeine", n_cells_per_target=10).X)
    np.testing.assert_array_equal(preds[0], preds[1])


def test_split_key_controls_training_cells():
    adata = toy_screen()
    adata.obs["split"] = np.where(adata.obs["drug"] == "caffeine", "test", "train")
    adata.obs.loc[adata.obs_names[:40], "split"] = "validation"
    setup_toy(adata)
    model = PerturbX(adata, **SMALL_ARCH)
    model.train(max_epochs=1, batch_size=64, split_key="split", enable_progress_bar=False)
    assert set(adata.obs["split"].iloc[model.train_indices]) == {"train"}
    assert len(model.validation_indices) == 40


def test_predict_conditions_predicts_each_perturbed_condition_from_controls(trained):
    model, adata = trained
    held = adata[adata.obs["drug"].isin(["control", "caffeine", "aspirin+caffeine"])].copy()
    pred = model.predict_conditions(held, n_cells_per_target=7, seed=0)
    conditions = held.obs.loc[held.obs["drug"] != "control", ["drug", "dose", "cell_type"]]
    expected = conditions.drop_duplicates().astype(str)
    got = pred.obs[["drug", "dose", "cell_type"]].astype(str).drop_duplicates()
    assert len(got) == len(expected) == 4  # two perturbations x two cell types
    assert set(map(tuple, got.to_numpy())) == set(map(tuple, expected.to_numpy()))
    assert pred.n_obs == 4 * 7
    # sources are controls of the same cell type, held out (not the treated cells)
    sources = pred.obs["source_cell"].astype(str)
    assert set(sources) <= set(held.obs_names[held.obs["drug"] == "control"])
    assert (held.obs.loc[sources, "cell_type"].to_numpy() == pred.obs["cell_type"].to_numpy()).all()


@pytest.mark.parametrize("how", ["train_size", "split_key"])
def test_training_without_validation_cells(how):
    adata = toy_screen()
    setup_toy(adata)
    model = PerturbX(adata, **SMALL_ARCH)
    if how == "split_key":
        adata.obs["split"] = "train"
        model.train(max_epochs=2, batch_size=64, split_key="split", enable_progress_bar=False)
    else:
        model.train(max_epochs=2, batch_size=64, train_size=1.0, enable_progress_bar=False)
    assert len(model.train_indices) == adata.n_obs
    assert len(model.history["reconstruction_loss_train"]) == 2
    assert "reconstruction_loss_validation" not in model.history


def test_sparse_input_is_never_densified():
    # 100k cells x 20k genes: a dense float32 copy would need 8 GB.
    n_cells, n_genes = 100_000, 20_000
    rng = np.random.default_rng(0)
    rows = np.arange(n_cells)
    matrix = sparse.csr_matrix(
        (np.ones(n_cells, np.float32), (rows, rng.integers(0, n_genes, n_cells))),
        shape=(n_cells, n_genes),
    )
    obs = pd.DataFrame(
        {"drug": rng.choice(["control", "KLF1"], n_cells)}, index=[f"c{i}" for i in rows]
    )
    adata = ad.AnnData(matrix, obs=obs)
    PerturbX.setup_anndata(adata, perturbation_key="drug")
    tracemalloc.start()
    model = PerturbX(
        adata, n_latent=4, n_hidden=8, n_layers=1, adversary_hidden=8, adversary_layers=1
    )
    model.train(
        max_epochs=1,
        max_steps=3,
        batch_size=256,
        enable_progress_bar=False,
        check_val_every_n_epoch=None,
    )
    latent = model.get_latent_representation(indices=np.arange(2000), batch_size=500)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert latent.shape == (2000, 4)
    assert sparse.issparse(adata.X)
    assert peak < 500 * 2**20, f"peak numpy allocation {peak / 2**20:.0f} MiB"


@pytest.mark.parametrize(
    ("likelihood", "dose_response"),
    [
        ("zinb", "logsigm"),
        ("nb", "sigm"),
        ("nb", "linear"),
        ("nb", "mlp"),
        ("gaussian", "amortized"),
    ],
)
def test_likelihoods_and_dose_responses_train_and_predict(likelihood, dose_response):
    adata = toy_screen(n_cells=300)
    if likelihood == "gaussian":
        adata.X = np.log1p(adata.X.toarray())
    setup_toy(adata)
    model = PerturbX(adata, likelihood=likelihood, dose_response=dose_response, **SMALL_ARCH)
    model.train(max_epochs=1, batch_size=64, enable_progress_bar=False)
    assert np.isfinite(model.history["reconstruction_loss_train"].to_numpy(dtype=float)).all()
    low, high = model.get_dose_response("aspirin", [0.1, 100.0])
    assert np.isfinite([low, high]).all()
    pred = model.predict(target={"drug": "aspirin", "dose": 3.0}, n_cells_per_target=10)
    assert np.isfinite(np.asarray(pred.X)).all()


def test_sampled_predictions_are_counts_and_seeded(trained):
    model, _ = trained
    kw = dict(target="caffeine", n_cells_per_target=20, sample=True)
    first = np.asarray(model.predict(seed=1, **kw).X)
    again = np.asarray(model.predict(seed=1, **kw).X)
    other = np.asarray(model.predict(seed=2, **kw).X)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    np.testing.assert_array_equal(first, np.round(first))
    assert model.predict(**kw).uns["perturbx_prediction"]["values"] == "samples"


def test_repeated_sources_give_every_target_its_cells_with_new_draws(trained):
    model, adata = trained
    controls = adata[adata.obs["drug"] == "control"].copy()
    few = controls[:7].copy()  # 7 source cells for 30 predicted cells: each used 4 or 5 times
    kw = dict(target="caffeine", n_cells_per_target=30, repeat_sources=True, seed=0)
    drawn = model.predict(few, sample=True, **kw)
    assert drawn.n_obs == 30
    uses = drawn.obs["source_cell"].value_counts()
    assert set(uses.index) == set(few.obs_names) and set(uses) <= {4, 5}
    X = np.asarray(drawn.X)
    first_cell = (drawn.obs["source_cell"] == few.obs_names[0]).to_numpy()
    assert len({tuple(row) for row in X[first_cell]}) > 1  # a new draw at every use
    expected = np.asarray(model.predict(few, **kw).X)
    assert all(np.array_equal(row, expected[first_cell][0]) for row in expected[first_cell])
    # without repeat_sources a target gets at most the matching cells, once each
    assert model.predict(few, target="caffeine", n_cells_per_target=30).n_obs == 7
    with pytest.raises(ValueError, match="needs n_cells_per_target"):
        model.predict(few, target="caffeine", repeat_sources=True)


def test_predict_conditions_draws_the_asked_number_of_cells_from_few_controls(trained):
    model, adata = trained
    held = adata[adata.obs["drug"].isin(["control", "caffeine"])].copy()
    n_controls = held.obs.loc[held.obs["drug"] == "control", "cell_type"].value_counts()
    assert n_controls.max() < 100
    pred = model.predict_conditions(held, n_cells_per_target=100, seed=0)
    assert (pred.obs.groupby("cell_type", observed=True).size() == 100).all()


def test_load_without_adata_then_predict_on_new_cells(trained, tmp_path):
    model, adata = trained
    model.save(tmp_path / "m", overwrite=True)
    loaded = PerturbX.load(tmp_path / "m")
    controls = adata[adata.obs["drug"] == "control"].copy()
    pred = loaded.predict(controls, target="aspirin", n_cells_per_target=5)
    expected = model.predict(controls.copy(), target="aspirin", n_cells_per_target=5)
    np.testing.assert_allclose(pred.X, expected.X, rtol=1e-6)


def test_load_with_different_genes_is_an_error(trained, tmp_path):
    model, adata = trained
    model.save(tmp_path / "m", overwrite=True)
    with pytest.raises(ValueError):
        PerturbX.load(tmp_path / "m", adata=adata[:, :-1].copy())


def test_negative_counts_rejected():
    adata = toy_screen(n_cells=100)
    dense = adata.X.toarray()
    dense[0, 0] = -1
    adata.X = dense
    setup_toy(adata)
    with pytest.raises(ValueError, match="negative"):
        PerturbX(adata, likelihood="nb")


def test_drug_encoder_and_amortised_dose_response_are_trained():
    adata = toy_screen(n_cells=300)
    setup_toy(adata)
    model = PerturbX(adata, **SMALL_ARCH)
    encoder = model.module.perturbation_embedding.drug_encoder
    amortizer = model.module.dose_response.amortizer
    before = [p.detach().clone() for p in [*encoder.parameters(), *amortizer.parameters()]]
    model.train(max_epochs=2, batch_size=64, enable_progress_bar=False)
    after = [*encoder.parameters(), *amortizer.parameters()]
    changed = [not torch.equal(b, a.detach()) for b, a in zip(before, after, strict=True)]
    assert all(changed), "every drug-encoder / amortiser tensor must receive updates"


def test_embedding_and_dose_response_own_their_structure_flags():
    # Reading a molecule's embedding from the learned table (as bench_embedding_ceiling does)
    # must leave its dose response amortised from the fingerprint.
    adata = toy_screen(n_cells=100)
    setup_toy(adata)
    module = PerturbX(adata, **SMALL_ARCH).module
    row = module.perturbation_embedding.has_structure.nonzero()[0]
    index = row + 1
    before = module.dose_response.parameters_for(index).detach().clone()
    module.perturbation_embedding.has_structure[row] = False
    assert bool(module.dose_response.has_structure[row])
    assert torch.equal(module.dose_response.parameters_for(index).detach(), before)


def test_mixed_precision_training_embeds_drugs_and_stays_finite():
    # Under autocast the drug encoder and the amortised dose response return bf16 rows that
    # go into float32 tables; this used to fail with a dtype error at the first minibatch.
    adata = toy_screen(n_cells=300)
    setup_toy(adata)
    model = PerturbX(adata, **SMALL_ARCH)
    encoder = model.module.perturbation_embedding.drug_encoder
    before = [p.detach().clone() for p in encoder.parameters()]
    model.train(max_epochs=2, batch_size=64, precision="bf16-mixed", enable_progress_bar=False)
    assert np.isfinite(model.history["reconstruction_loss_train"].to_numpy(dtype=float)).all()
    assert all(
        not torch.equal(b, a.detach()) for b, a in zip(before, encoder.parameters(), strict=True)
    )
    assert all(p.dtype == torch.float32 for p in model.module.parameters())
    pred = model.predict(target={"drug": "aspirin", "dose": 3.0}, n_cells_per_target=10)
    assert np.isfinite(np.asarray(pred.X)).all()


@pytest.mark.parametrize("mean_count", [0.2, 5.0, 60.0])
def test_negative_binomial_log_likelihood_matches_scvi_and_autograd(mean_count):
    """The hand-written NB likelihood equals scvi's NB log-probability summed over genes, and
    its backward equals finite differences: on counts inside the gamma-function tables
    (0..32), above them and non-integer, sparse and dense."""
    from scvi.distributions import NegativeBinomial

    from perturbx.module._likelihood import _GAMMA_TABLE_MAX_COUNT, negative_binomial_log_likelihood

    rng = np.random.default_rng(0)
    counts = rng.poisson(mean_count, size=(6, 9)).astype(np.float64)
    counts[2] = 0  # a cell without counts
    counts[:, 4] = 0  # a gene without counts
    counts[0, 0] = 250  # a large count
    counts[1, 1] = _GAMMA_TABLE_MAX_COUNT  # the table's last column
    counts[3, 2] = 2.5  # a non-integer count (e.g. ambient-corrected data)
    x = torch.tensor(counts, dtype=torch.float64)
    log_rate = torch.randn(6, 9, dtype=torch.float64, requires_grad=True)
    log_theta = torch.randn(9, dtype=torch.float64, requires_grad=True)

    value = negative_binomial_log_likelihood(x, log_rate, log_theta)
    expected = NegativeBinomial(mu=log_rate.exp(), theta=log_theta.exp()).log_prob(x).sum(-1)
    assert value.shape == (6,)
    # scvi adds eps = 1e-8 inside its logarithms (an error growing with the counts)
    torch.testing.assert_close(value, expected, atol=1e-5, rtol=1e-7)
    assert torch.autograd.gradcheck(
        lambda rate, theta: negative_binomial_log_likelihood(x, rate, theta),
        (log_rate, log_theta),
    )


def _module_and_batch(**kwargs):
    """An untrained toy model's module and one 64-cell minibatch of its data."""
    adata = toy_screen()
    setup_toy(adata)
    model = PerturbX(adata, **SMALL_ARCH, **kwargs)
    return model.module, next(iter(model._make_data_loader(adata, batch_size=64)))


def test_adversary_losses_leave_out_rows_without_a_label():
    import torch.nn.functional as F
    from scvi import REGISTRY_KEYS

    from perturbx.data._fields import NO_LABEL, PERTURBATIONS_KEY

    module, batch = _module_and_batch()
    batch[PERTURBATIONS_KEY] = batch[PERTURBATIONS_KEY].clone()
    batch[PERTURBATIONS_KEY][::3, 0] = NO_LABEL
    batch[REGISTRY_KEYS.CAT_COVS_KEY] = torch.full_like(batch[REGISTRY_KEYS.CAT_COVS_KEY], NO_LABEL)
    basal = torch.randn(64, SMALL_ARCH["n_latent"], generator=torch.Generator().manual_seed(0))
    losses = module.adversary_losses(basal, batch)

    target = batch[PERTURBATIONS_KEY][:, 0].long()
    valid = target != NO_LABEL
    logits = module.perturbation_adversary(basal)[valid]
    torch.testing.assert_close(losses.cross_entropy, F.cross_entropy(logits, target[valid]))
    want = (logits.argmax(-1) == target[valid]).float().mean()
    torch.testing.assert_close(losses.accuracy["perturbation"], want)
    # no cell-type labels: that adversary is skipped
    assert set(losses.accuracy) == {"perturbation"}
    # Confusion, by hand: KL from the labelled cells' label frequencies to each cell's
    # predicted distribution, averaged over the labelled cells.
    labels, counts = np.unique(target[valid].numpy(), return_counts=True)
    frequency = counts / counts.sum()
    log_p = torch.log_softmax(logits.double(), -1).detach().numpy()
    kl = [np.sum(frequency * (np.log(frequency) - row[labels])) for row in log_p]
    np.testing.assert_allclose(losses.confusion.item(), np.mean(kl), rtol=1e-5)


def test_adversary_confusion_is_zero_when_the_adversaries_predict_the_label_mix():
    from scvi import REGISTRY_KEYS

    from perturbx.data._fields import PERTURBATIONS_KEY

    module, batch = _module_and_batch()
    labels = [batch[PERTURBATIONS_KEY][:, 0].long()]
    covariates = batch[REGISTRY_KEYS.CAT_COVS_KEY].long()
    labels += [covariates[:, i] for i in range(len(module.covariate_names))]
    adversaries = [module.perturbation_adversary, *module.covariate_adversaries]
    assert len(adversaries) == 2
    for adversary, label in zip(adversaries, labels, strict=True):
        frequency = torch.bincount(label, minlength=adversary.n_classes) / len(label)
        final = adversary.net[-1]
        with torch.no_grad():  # ignore the input, predict the minibatch's label mix
            final.weight.zero_()
            final.bias.copy_(torch.log(frequency.clamp_min(1e-30)))
    basal = torch.randn(64, SMALL_ARCH["n_latent"])
    assert abs(module.adversary_losses(basal, batch).confusion.item()) < 1e-6
    with torch.no_grad():  # any other prediction is penalised
        adversaries[1].net[-1].bias.add_(torch.tensor([0.5, -0.5]))
    assert module.adversary_losses(basal, batch).confusion.item() > 0.01


@pytest.mark.parametrize("variational", [True, False])
def test_adversaries_see_the_posterior_mean_not_a_sample(variational):
    module, batch = _module_and_batch(variational=variational)
    module.train()  # training mode: the basal latent is a sample
    outputs = module.inference(**module._get_inference_input(batch))
    seen = module.adversary_latent(outputs)
    if variational:
        torch.testing.assert_close(seen, outputs["qz"].loc)
        assert not torch.allclose(seen, outputs["basal_latent"])
    else:
        assert seen is outputs["basal_latent"]


def test_zero_layers_give_a_linear_decoder_and_negative_ones_are_refused():
    adata = toy_screen()
    setup_toy(adata)
    model = PerturbX(adata, **{**SMALL_ARCH, "n_layers": 0})
    assert len(model.module.decoder_body) == 0
    assert model.module.scale_head.in_features == SMALL_ARCH["n_latent"]
    model.train(
        max_epochs=1,
        max_steps=2,
        batch_size=64,
        enable_progress_bar=False,
        check_val_every_n_epoch=None,
    )
    assert model.get_latent_representation().shape == (adata.n_obs, SMALL_ARCH["n_latent"])
    with pytest.raises(ValueError, match="n_layers=-1"):
        PerturbX(adata, **{**SMALL_ARCH, "n_layers": -1})
