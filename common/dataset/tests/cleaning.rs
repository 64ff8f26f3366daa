//! Cleaning in `dataset pack`: missing values refused with the line and column (and the
//! fix), or their rows dropped, or filled with the training split's column mean or median
//! (never from validation rows); exact duplicate rows removed before the split; every count
//! in the report and the manifest's `source`.

use ringmaster_dataset::{
    Dataset, DatasetManifest, LabelColumn, Labels, Missing, PackInput, PackOptions, PackTask, pack,
};
use std::path::Path;

/// Rows 2..9 of the file (line 1 is the header): two exact repeats, a gap in each feature
/// column, a missing label.
const TABLE: &str = "a,b,label\n1,2,0\n1,2,0\n3,,1\n5,6,\n7,8,1\nNA,10,0\n11,12,1\n9,9,1\n";

fn options(csv: &Path, out: &Path, missing: Missing, dedup: bool, val: f64) -> PackOptions {
    PackOptions {
        input: PackInput::Csv {
            path: csv.into(),
            label_column: LabelColumn::Last,
            has_header: None,
            skip_rows: 0,
            delimiter: b',',
            labels: None,
        },
        task: PackTask::Classification,
        output: out.into(),
        name: "t".into(),
        val_fraction: val,
        standardize: false,
        shard_samples: None,
        seed: 3,
        show_progress: false,
        missing,
        dedup,
    }
}

fn rows(dir: &Path) -> Vec<(Vec<f32>, i64)> {
    let ds = Dataset::load(dir).unwrap();
    let Labels::Classes(y) = &ds.y else {
        panic!("class labels expected")
    };
    (0..ds.len())
        .map(|i| (ds.sample(i).unwrap().0.to_vec(), y[i]))
        .collect()
}

#[test]
fn missing_values_are_refused_by_default_naming_line_and_column() {
    let tmp = tempfile::tempdir().unwrap();
    let csv = tmp.path().join("t.csv");
    std::fs::write(&csv, TABLE).unwrap();
    let err = pack(&options(
        &csv,
        &tmp.path().join("o"),
        Missing::Error,
        false,
        0.0,
    ))
    .unwrap_err()
    .to_string();
    assert_eq!(
        err,
        format!(
            "{}:4: column 2: missing value ``; choose --missing drop, mean or median to drop \
             or fill such rows",
            csv.display()
        )
    );
    assert!(!tmp.path().join("o/train").exists(), "nothing written");
}

#[test]
fn drop_and_dedup_remove_rows_and_count_them() {
    let tmp = tempfile::tempdir().unwrap();
    let csv = tmp.path().join("t.csv");
    std::fs::write(&csv, TABLE).unwrap();
    let out = tmp.path().join("o");
    let report = pack(&options(&csv, &out, Missing::Drop, true, 0.0)).unwrap();
    assert_eq!(
        (
            report.missing_values,
            report.rows_dropped,
            report.duplicates_removed
        ),
        (2, 3, 1)
    );
    assert_eq!(
        rows(&out.join("train")),
        vec![
            (vec![1.0, 2.0], 0),
            (vec![7.0, 8.0], 1),
            (vec![11.0, 12.0], 1),
            (vec![9.0, 9.0], 1)
        ]
    );
    let manifest = DatasetManifest::read(&out.join("train")).unwrap();
    let source = manifest.source.unwrap_or_default();
    assert!(
        source.contains(
            "2 missing feature values (rows dropped), 3 rows dropped for missing values, 1 \
             duplicate rows removed; 4 rows"
        ),
        "{source}"
    );
}

#[test]
fn fills_come_from_the_training_split_only() {
    let tmp = tempfile::tempdir().unwrap();
    let csv = tmp.path().join("t.csv");
    std::fs::write(&csv, TABLE).unwrap();
    for (missing, name) in [(Missing::Mean, "mean"), (Missing::Median, "median")] {
        let out = tmp.path().join(name);
        let report = pack(&options(&csv, &out, missing, true, 0.34)).unwrap();
        // The missing label's row is dropped, the repeat removed: 6 rows, 2 to validation.
        assert_eq!((report.rows_dropped, report.duplicates_removed), (1, 1));
        assert_eq!((report.train_samples, report.val_samples), (4, 2));
        let train = rows(&out.join("train"));
        let val = rows(&out.join("val"));
        // The fill is computed from the training rows' known values only.
        let all: Vec<&(Vec<f32>, i64)> = train.iter().chain(&val).collect();
        assert!(all.iter().all(|(x, _)| x.iter().all(|v| v.is_finite())));
        // The rows whose gap was filled: (3, ?) and (?, 10), wherever the split put them.
        let filled_b = all.iter().find(|(x, _)| x[0] == 3.0).unwrap().0[1];
        let filled_a = all.iter().find(|(x, _)| x[1] == 10.0).unwrap().0[0];
        let known_b: Vec<f32> = train
            .iter()
            .filter(|(x, _)| x[0] != 3.0)
            .map(|(x, _)| x[1])
            .collect();
        let known_a: Vec<f32> = train
            .iter()
            .filter(|(x, _)| x[1] != 10.0)
            .map(|(x, _)| x[0])
            .collect();
        let expect = |mut v: Vec<f32>| match missing {
            Missing::Mean => v.iter().sum::<f32>() / v.len() as f32,
            _ => {
                v.sort_by(f32::total_cmp);
                let m = v.len() / 2;
                if v.len() % 2 == 1 {
                    v[m]
                } else {
                    (v[m - 1] + v[m]) / 2.0
                }
            }
        };
        assert_eq!(filled_b, expect(known_b), "{name}: column b");
        assert_eq!(filled_a, expect(known_a), "{name}: column a");
    }
}
