"The study run end to end by `spseg.study` on a micro cohort: resumable, its CSVs, baselines and sentences."
import shutil, warnings
import numpy as np, pandas as pd, pytest, torch
warnings.filterwarnings('ignore', message='`torch.jit.script` is deprecated')
import spseg.experiments as E
from spseg.data import hv_map, list_tissues, load_tissue, split_tissues
from spseg.experiments import study_grid
from spseg.synthetic import make_cohort
from spseg.study import (agreement, check_cohort, run_study, table_configs, table_frame, row_fields, row_label,
                         INSTANCE_SCORES)

torch.set_num_threads(2)
TABLES = (3, 6, 7)


@pytest.fixture(scope='module')
def study(tmp_path_factory):
    "Tables 3, 6 and 7 at one epoch per run on five synthetic tissues of one tile each."
    root = tmp_path_factory.mktemp('study')
    cohort, out = root/'cohort', root/'out'
    make_cohort(cohort, n_tissues=5, size=120, seed=0, progress=False)
    return cohort, out, run_study(cohort, out, tables=TABLES, epochs=1)


def test_configs_repeat_the_grid_over_seeds():
    g = table_configs(2, '/c', seeds=3)
    assert [c for k, c in g[:8]] == study_grid('loss', '/c')             # seed 0 first: today's grid
    assert [(c.seed, c.encoder_seed) for _, c in g] == [(s, s) for s in range(3) for _ in range(8)]
    assert len({c.hash for _, c in g}) == 24
    six = table_configs(6, '/c')
    assert [k for k, _ in six] == ['study', 'study', 'extension', 'extension']
    assert [(c.encoder, c.finetune_encoder) for _, c in six] == [('cellvit', False), ('virtues', False),
                                                                 ('fusion', False), ('virtues', True)]


def test_too_small_a_cohort_is_refused_up_front(tmp_path):
    make_cohort(tmp_path, n_tissues=3, size=120, seed=0, progress=False)
    check_cohort(tmp_path, (5, 6, 7, 8))                                 # cv3 and sequential: three are enough
    with pytest.raises(ValueError, match=r'too few for table 2 \(quarter split, fold 2: 1 to train, 0 to test\)'):
        check_cohort(tmp_path, (2,))


def test_csv_columns_and_rows(study):
    cohort, out, frames = study
    want = ['caches', 'cohort.json', 'figures', 'runs', 'runs.csv', 'scores', 'table3.csv', 'table6.csv', 'table7.csv']
    assert sorted(p.name for p in out.iterdir()) == want
    t3 = pd.read_csv(out/'table3.csv')
    assert list(t3.columns) == ['table', 'study', 'config', 'kind', 'skips', 'n_runs', 'best_mean_dice',
                                'best_mean_dice_std', 'study_best_mean_dice', 'study_best_mean_dice_std',
                                'last_mean_dice', 'last_mean_dice_std', 'epochs_mean_dice', 'epochs_mean_dice_std',
                                'epochs_std_dice', 'epochs_std_dice_std', 'best_epoch', 'epochs_run', 'seconds']
    assert t3.config.tolist() == ['skips=False', 'skips=True', 'majority class']
    assert t3.n_runs.tolist() == [2, 2, 2]
    assert t3.study_best_mean_dice.tolist()[:2] == [0.4330, 0.4787]
    t7 = pd.read_csv(out/'table7.csv')
    assert t7.config.tolist() == ['encoder=cellvit', 'encoder=virtues', 'all foreground, zero HV']
    for c in ['best_hv_mse', 'study_best_hv_mse', 'best_binary_dice', 'study_best_binary_dice', 'best_valid_loss',
              'study_best_valid_loss', 'last_hv_mse', 'last_binary_dice', *INSTANCE_SCORES]:
        assert c in t7.columns, c
    assert t7.loc[1, 'study_best_hv_mse'] == 0.0743
    runs = pd.read_csv(out/'runs.csv')
    assert runs.table.tolist() == [3] * 4 + [6] * 4 + [7] * 2
    for c in ['table', 'study', 'config', 'skips', 'encoder', 'fold', 'seed', 'best_mean_dice', 'last_mean_dice',
              'best_epoch', 'epochs_run', 'seconds', 'run', 'best_hv_mse', 'last_hv_mse', *INSTANCE_SCORES]:
        assert c in runs.columns, c
    assert all((out/r).is_dir() for r in runs.run)
    assert (runs.epochs_run == 1).all()
    pd.testing.assert_frame_equal(frames[3], t3, check_dtype=False)
    t6 = pd.read_csv(out/'table6.csv')
    assert t6.kind.tolist() == ['study', 'study', 'extension', 'extension', 'baseline']
    assert t6.encoder.tolist()[:4] == ['cellvit', 'virtues', 'fusion', 'virtues']
    assert t6.finetune_encoder.tolist()[:4] == [False, False, False, True]
    assert t6.study_best_mean_dice.tolist()[:2] == [0.2696, 0.6293] and t6.study_best_mean_dice.iloc[2:].isna().all()
    per_class = [f'{n}_c{k}' for n in ('dice', 'pred_pct', 'gt_pct') for k in range(10)]
    assert set(per_class) <= set(t6.columns)                   # every class, also one absent from the split
    assert t6[[f'gt_pct_c{k}' for k in range(10)]].sum(1).tolist() == pytest.approx([100] * 5)
    assert t6.loc[4, 'pred_pct_c0'] == 100                     # the majority baseline predicts background only


def _majority_dice(masks):
    "Mean Dice of background everywhere over the classes in the truth, from the masks alone."
    y = np.concatenate([m.ravel() for m in masks])
    d0 = 2 * (y == 0).sum() / ((y == 0).sum() + y.size)
    return d0 / len(np.unique(y))


def test_baseline_rows(study):
    cohort, out, _ = study
    ids = [p.name for p in list_tissues(cohort)]
    t3 = pd.read_csv(out/'table3.csv').set_index('config')
    want = [_majority_dice([np.array(load_tissue(cohort/i).mask) for i in split_tissues(ids, 'quarter', f)[1]])
            for f in (1, 2)]
    b = t3.loc['majority class']
    assert b.kind == 'baseline' and b.n_runs == 2
    assert b.best_mean_dice == pytest.approx(np.mean(want)) and b.best_mean_dice_std == pytest.approx(np.std(want))
    assert b.last_mean_dice == b.best_mean_dice and np.isnan(b.study_best_mean_dice)
    t7 = pd.read_csv(out/'table7.csv').set_index('config')
    z = t7.loc['all foreground, zero HV']
    inst = [load_tissue(cohort/i).inst for i in split_tissues(ids, 'sequential')[1]]
    n_nuc, n = sum((i > 0).sum() for i in inst), sum(i.size for i in inst)
    assert z.best_binary_dice == pytest.approx(2 * n_nuc / (n_nuc + n))
    assert z.best_hv_mse == pytest.approx(sum((hv_map(i) ** 2).sum() for i in inst) / (2 * n))
    assert z.bpq == 0 and np.isnan(z.best_valid_loss)


def test_rerun_trains_nothing(study, monkeypatch):
    cohort, out, frames = study
    stamp = {p.name: p.stat().st_mtime_ns for p in (out/'runs').iterdir()}
    def no_training(*a, **k): raise AssertionError('a finished run was trained again')
    monkeypatch.setattr(E, '_fit', no_training)
    again = run_study(cohort, out, tables=TABLES, epochs=1)
    assert {p.name: p.stat().st_mtime_ns for p in (out/'runs').iterdir()} == stamp
    for t in TABLES: pd.testing.assert_frame_equal(again[t], frames[t])
    run_study(cohort, out, tables=(3,), epochs=1)                      # one table again: the others' rows are kept
    assert pd.read_csv(out/'runs.csv').table.tolist() == [6] * 4 + [7] * 2 + [3] * 4


def test_seeds_add_runs_and_keep_seed_zero(study, tmp_path):
    "A second seed trains only its own runs; the rows pool folds x seeds."
    cohort, out, frames = study
    t = tmp_path/'seeds'
    shutil.copytree(out/'runs', t/'runs')                               # the finished seed-0 runs
    stamp = {p.name: p.stat().st_mtime_ns for p in (t/'runs').iterdir()}
    two = run_study(cohort, t, tables=(3,), seeds=2, epochs=1)[3]
    assert {p.name: p.stat().st_mtime_ns for p in (t/'runs').iterdir() if p.name in stamp} == stamp
    assert len(list((t/'runs').iterdir())) == len(stamp) + 4 and two.n_runs.tolist() == [4, 4, 2]
    runs = pd.read_csv(t/'runs.csv')
    assert sorted(runs.seed.tolist()) == [0] * 4 + [1] * 4
    assert two.best_mean_dice.iloc[0] == pytest.approx(runs[runs.skips == False].best_mean_dice.mean())


def _hand_made(path):
    "A Table 7 as written: HV MSE (lower is better) and binary Dice over three runs per row, and the baseline."
    rows = [dict(table=7, study='instance', config='encoder=cellvit', kind='study', encoder='cellvit', n_runs=3,
                 best_hv_mse=.05, best_hv_mse_std=.002, study_best_hv_mse=.0566, best_binary_dice=.70,
                 best_binary_dice_std=.05, study_best_binary_dice=.7170),
            dict(table=7, study='instance', config='encoder=virtues', kind='study', encoder='virtues', n_runs=3,
                 best_hv_mse=.07, best_hv_mse_std=.002, study_best_hv_mse=.0743, best_binary_dice=.72,
                 best_binary_dice_std=.05, study_best_binary_dice=.7156),
            dict(table=7, study='instance', config='all foreground, zero HV', kind='baseline', n_runs=1,
                 best_hv_mse=.06, best_hv_mse_std=0, best_binary_dice=.40, best_binary_dice_std=0)]
    pd.DataFrame(rows).to_csv(path, index=False)
    return pd.read_csv(path)


def test_agreement_sentences_on_a_hand_made_table(tmp_path):
    s = agreement(_hand_made(tmp_path/'table7.csv'))
    assert len(s) == 4 and all(x.startswith('Table 7, ') for x in s)
    hv, hv_base, dice, dice_base = s
    assert 'encoder=virtues vs encoder=cellvit' in hv and '(+0.0200)' in hv and '(+0.0177)' in hv
    assert 'same direction' in hv and 'exceeds the spread' in hv and '3 runs per row' in hv
    assert 'opposite direction' in dice and 'is within the spread' in dice        # +0.02 vs -0.0014, spread 0.07
    assert '1 of 2 configurations beat the trivial baseline' in hv_base and 'not: encoder=virtues.' in hv_base
    assert '2 of 2 configurations beat' in dice_base


def test_table_frame_means_and_population_std():
    recs = [dict(table=4, study='oversampling', config=f'gamma={g}', kind='study', gamma=g, fold=f, seed=s,
                 best_mean_dice=d, last_mean_dice=d) for g, ds in ((0.0, (.1, .3, .2, .4)), (0.85, (.5, .5, .5, .5)))
            for (f, s), d in zip([(1, 0), (2, 0), (1, 1), (2, 1)], ds)]
    df = table_frame(recs)
    assert df.n_runs.tolist() == [4, 4]
    assert df.best_mean_dice.tolist() == pytest.approx([.25, .5])
    assert df.best_mean_dice_std.tolist() == pytest.approx([np.std([.1, .3, .2, .4]), 0])
    assert df.study_best_mean_dice.tolist() == [0.4798, 0.4930]
    assert df.study_best_mean_dice_std.tolist() == [0.0624, 0.0778]
    assert row_fields(4) == ['gamma'] and row_label(table_configs(4, '/c')[0][1], ['gamma']) == 'gamma=0.0'


def test_table8_compares_the_mean_over_epochs_too():
    "Table 8's study gives best and mean-over-epochs Dice; the baseline has no epochs, so no baseline sentence for it."
    rows = [dict(table=8, study='decoder', config=f'variant={v}', kind='study', variant=v, n_runs=1, best_mean_dice=b,
                 study_best_mean_dice=sb, epochs_mean_dice=m, study_epochs_mean_dice=sm)
            for v, b, sb, m, sm in (('baseline', .60, .6255, .58, .6065), ('boundary', .62, .6291, .57, .6106))]
    rows.append(dict(table=8, study='decoder', config='majority class', kind='baseline', n_runs=1, best_mean_dice=.1))
    s = agreement(pd.DataFrame(rows))
    assert len(s) == 3
    assert s[0].startswith('Table 8, mean Dice, variant=boundary vs variant=baseline') and 'same direction' in s[0]
    assert 'no spread to compare with' in s[0]
    assert s[1].startswith('Table 8, mean Dice: 2 of 2 configurations beat')
    assert s[2].startswith('Table 8, mean Dice over the epochs, variant=boundary') and 'opposite direction' in s[2]


def test_cohort_record_and_figures(study):
    "cohort.json says what the tables came from; the figures are PNG files drawn from the written results."
    import json
    from spseg.study import FIGURES
    cohort, out, _ = study
    rec = json.loads((out/'cohort.json').read_text())
    assert [t['id'] for t in rec['tissues']] == [p.name for p in list_tissues(cohort)]
    assert {(t['height'], t['width']) for t in rec['tissues']} == {(120, 120)}
    assert rec['recipe'] == dict(generator='spseg.synthetic.make_cohort', n_tissues=5, size=120, seed=0, prefix='tissue')
    assert (rec['preset'], rec['seeds'], rec['tables'], rec['overrides']) == ('tiny', 1, list(TABLES), dict(epochs=1))
    assert rec['epochs'] == {str(t): 1 for t in TABLES}
    for f in FIGURES: assert (out/'figures'/f).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n', f
