//! Image datasets through the public API: u8 and f32 pixels round trip
//! through shards in their own type (u8 at one byte per value), reading
//! applies the recorded per-channel normalization exactly, `pack_images`
//! fits it on the training split only and transposes channels-last arrays,
//! bad shapes, dtypes and normalizations are refused with their text, and
//! flat `[d]` manifests written before images read unchanged.

use std::path::{Path, PathBuf};

use npyz::WriterBuilder;
use ringmaster_dataset::{
    Dataset, DatasetManifest, ElementType, FeatureRows, ImageLayout, ImageNormalization,
    ImageOptions, LabelKind, LabelRows, Labels, PackTask, WriteOptions, pack_images,
    write_dataset_rows,
};

fn image_opts(
    shape: [usize; 3],
    dtype: ElementType,
    norm: Option<ImageNormalization>,
) -> WriteOptions {
    WriteOptions {
        name: "img".into(),
        features: shape.iter().product(),
        labels: LabelKind::Classes(3),
        shard_samples: 2,
        standardization: None,
        source: None,
        image: Some(ImageLayout {
            shape,
            dtype,
            normalization: norm,
        }),
        tokenizer: None,
    }
}

/// The stored `x` of shard `index`: safetensors dtype, shape and bytes.
fn stored_x(dir: &Path, index: usize) -> (safetensors::Dtype, Vec<usize>, Vec<u8>) {
    let bytes = std::fs::read(dir.join(format!("shard-{index:05}.safetensors"))).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let x = st.tensor("x").unwrap();
    (x.dtype(), x.shape().to_vec(), x.data().to_vec())
}

#[test]
fn u8_images_round_trip_at_one_byte_per_value() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ds");
    // 5 images of [2, 2, 3]: 12 values each.
    let x: Vec<u8> = (0..60).map(|i| (i * 17 % 256) as u8).collect();
    let y = [0i64, 1, 2, 1, 0];
    let opts = image_opts([2, 2, 3], ElementType::U8, None);
    let written =
        write_dataset_rows(&dir, &opts, FeatureRows::U8(&x), LabelRows::Classes(&y)).unwrap();
    assert_eq!(written.shards.len(), 3);
    assert_eq!(written.features(), 12);
    assert_eq!(written.image_shape(), Some([2, 2, 3]));

    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("MANIFEST.json")).unwrap()).unwrap();
    assert_eq!(
        json["schema"]["features"],
        serde_json::json!({"name": "x", "dtype": "u8", "shape": [2, 2, 3]})
    );
    assert!(json.get("image_normalization").is_none(), "{json}");

    let (dtype, shape, data) = stored_x(&dir, 0);
    assert_eq!(dtype, safetensors::Dtype::U8);
    assert_eq!(shape, [2, 2, 2, 3]);
    assert_eq!(data, x[..24]);

    let ds = Dataset::load(&dir).unwrap();
    assert_eq!(ds.features, 12);
    assert_eq!(ds.x, x.iter().map(|&v| f32::from(v)).collect::<Vec<_>>());
    assert_eq!(ds.y, Labels::Classes(y.to_vec()));

    // The wrong element type for the dataset is refused before any file.
    let err = write_dataset_rows(
        &tmp.path().join("other"),
        &opts,
        FeatureRows::F32(&[0.0; 60]),
        LabelRows::Classes(&y),
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid input: the dataset stores u8 features, but f32 values were given"
    );
    assert!(!tmp.path().join("other").exists());
}

#[test]
fn f32_images_round_trip_and_read_normalized() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ds");
    let x: Vec<f32> = (0..24).map(|i| i as f32 * 0.5 - 3.0).collect();
    let y = [0i64, 1, 2];
    let norm = ImageNormalization {
        scale: 1.0,
        mean: vec![0.5, -1.0],
        std: vec![2.0, 0.25],
    };
    let opts = image_opts([2, 2, 2], ElementType::F32, Some(norm.clone()));
    write_dataset_rows(&dir, &opts, FeatureRows::F32(&x), LabelRows::Classes(&y)).unwrap();
    let (dtype, shape, data) = stored_x(&dir, 0);
    assert_eq!(dtype, safetensors::Dtype::F32);
    assert_eq!(shape, [2, 2, 2, 2]);
    // Stored as given: normalization is recorded, not applied.
    assert_eq!(
        data,
        x[..16]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect::<Vec<_>>()
    );
    let ds = Dataset::load(&dir).unwrap();
    let expected: Vec<f32> = x
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            let c = (i % 8) / 4;
            (v * 1.0 - norm.mean[c]) / norm.std[c]
        })
        .collect();
    assert_eq!(ds.x, expected);
    assert_eq!(ds.manifest.image_normalization, Some(norm));
}

#[test]
fn reading_u8_applies_scale_mean_and_std_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ds");
    // 3 images of [3, 1, 2].
    let x: Vec<u8> = vec![
        0, 255, 1, 2, 128, 64, 10, 20, 30, 40, 50, 60, 7, 8, 9, 250, 251, 252,
    ];
    let y = [2i64, 0, 1];
    let norm = ImageNormalization {
        scale: 1.0 / 255.0,
        mean: vec![0.485, 0.456, 0.406],
        std: vec![0.229, 0.224, 0.225],
    };
    let opts = image_opts([3, 1, 2], ElementType::U8, Some(norm.clone()));
    write_dataset_rows(&dir, &opts, FeatureRows::U8(&x), LabelRows::Classes(&y)).unwrap();
    let ds = Dataset::load(&dir).unwrap();
    for (i, (&got, &v)) in ds.x.iter().zip(&x).enumerate() {
        let c = (i % 6) / 2;
        let want = (f32::from(v) * norm.scale - norm.mean[c]) / norm.std[c];
        assert_eq!(got.to_bits(), want.to_bits(), "value {i}");
    }
    let m = DatasetManifest::read(&dir).unwrap();
    assert_eq!(m.features(), 6);
    // Decoded bytes (what the stream cache counts) are f32 features.
    assert_eq!(m.decoded_bytes(), 3 * (4 * 6 + 8));
}

fn write_npy_u8(path: &Path, shape: &[u64], values: &[u8]) {
    let mut w = npyz::WriteOptions::new()
        .default_dtype()
        .shape(shape)
        .writer(std::fs::File::create(path).unwrap())
        .begin_nd()
        .unwrap();
    w.extend(values.iter().copied()).unwrap();
    w.finish().unwrap();
}

fn write_npy_f64(path: &Path, shape: &[u64], values: &[f64]) {
    let mut w = npyz::WriteOptions::new()
        .default_dtype()
        .shape(shape)
        .writer(std::fs::File::create(path).unwrap())
        .begin_nd()
        .unwrap();
    w.extend(values.iter().copied()).unwrap();
    w.finish().unwrap();
}

fn pack_opts(images: &Path, labels: &Path, out: &Path) -> ImageOptions {
    ImageOptions {
        images: images.into(),
        labels: labels.into(),
        channels_last: false,
        normalize: true,
        normalization_from: None,
        task: PackTask::Classification,
        output: out.into(),
        name: "img".into(),
        val_fraction: 0.0,
        shard_samples: None,
        seed: 3,
        dedup: false,
    }
}

fn files(dir: &Path) -> (PathBuf, PathBuf) {
    (dir.join("x.npy"), dir.join("y.npy"))
}

#[test]
fn packed_normalization_comes_from_the_training_split_only() {
    let tmp = tempfile::tempdir().unwrap();
    let (xp, yp) = files(tmp.path());
    // 20 one-channel 1×2 images: pixel 0 is 10, pixel 1 the image's index,
    // so that which images went to validation can be read back.
    let n = 20;
    let x: Vec<u8> = (0..n).flat_map(|r| [10, r as u8]).collect();
    let y: Vec<i64> = (0..n as i64).map(|i| i % 2).collect();
    npyz::to_file_1d(&yp, y.iter().copied()).unwrap();
    let pack_with = |x: &[u8], out: &str, normalize: bool| {
        write_npy_u8(&xp, &[n as u64, 1, 2], x);
        let mut opts = pack_opts(&xp, &yp, &tmp.path().join(out));
        opts.val_fraction = 0.25;
        opts.normalize = normalize;
        pack_images(&opts).unwrap()
    };
    let plain = pack_with(&x, "a", false);
    assert_eq!((plain.train_samples, plain.val_samples), (15, 5));
    assert_eq!(plain.normalization, None);
    let val = Dataset::load(&tmp.path().join("a/val")).unwrap();
    assert_eq!(val.manifest.image_normalization, None);
    let val_rows: Vec<usize> = val.x.chunks(2).map(|p| p[1] as usize).collect();
    assert_eq!(val_rows.len(), 5);

    // The same seed splits the same way, so an outlier (255) in a validation
    // image leaves the statistics alone; in a training image it moves them.
    let base = pack_with(&x, "b", true).normalization.unwrap();
    let mut outlier = x.clone();
    outlier[val_rows[0] * 2] = 255;
    let same = pack_with(&outlier, "c", true).normalization.unwrap();
    assert_eq!(base, same, "a validation-only outlier moved the statistics");
    let train_row = (0..n).find(|r| !val_rows.contains(r)).unwrap();
    let mut outlier = x.clone();
    outlier[train_row * 2] = 255;
    assert_ne!(base, pack_with(&outlier, "d", true).normalization.unwrap());

    // Both manifests record the same normalization: the training pixels'
    // mean and population std after scaling by 1/255.
    let train = DatasetManifest::read(&tmp.path().join("b/train")).unwrap();
    let val = DatasetManifest::read(&tmp.path().join("b/val")).unwrap();
    assert_eq!(train.image_normalization.as_ref(), Some(&base));
    assert_eq!(val.image_normalization.as_ref(), Some(&base));
    let pixels: Vec<f64> = (0..n)
        .filter(|r| !val_rows.contains(r))
        .flat_map(|r| [10.0 / 255.0, r as f64 / 255.0])
        .collect();
    let mean = pixels.iter().sum::<f64>() / pixels.len() as f64;
    let var = pixels.iter().map(|p| (p - mean).powi(2)).sum::<f64>() / pixels.len() as f64;
    assert_eq!(base.scale, 1.0 / 255.0);
    assert!(
        (f64::from(base.mean[0]) - mean).abs() < 1e-6,
        "{base:?} vs {mean}"
    );
    assert!(
        (f64::from(base.std[0]) - var.sqrt()).abs() < 1e-6,
        "{base:?}"
    );
    // And the validation set is read with it, as the training set is.
    let val = Dataset::load(&tmp.path().join("b/val")).unwrap();
    let first = x[val_rows[0] * 2 + 1];
    assert_eq!(
        val.x[1],
        (f32::from(first) * base.scale - base.mean[0]) / base.std[0]
    );
}

#[test]
fn a_given_normalization_is_recorded_as_is_and_must_fit_the_images() {
    let tmp = tempfile::tempdir().unwrap();
    let (xp, yp) = files(tmp.path());
    let n = 6u64;
    npyz::to_file_1d(&yp, (0..n as i64).map(|i| i % 2)).unwrap();
    write_npy_u8(&xp, &[n, 1, 2], &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);
    let given = ImageNormalization {
        scale: 1.0 / 255.0,
        mean: vec![0.5],
        std: vec![0.25],
    };
    let mut opts = pack_opts(&xp, &yp, &tmp.path().join("given"));
    opts.normalization_from = Some(given.clone());
    let report = pack_images(&opts).unwrap();
    assert_eq!(report.normalization.as_ref(), Some(&given));
    let m = DatasetManifest::read(&tmp.path().join("given/train")).unwrap();
    assert_eq!(m.image_normalization, Some(given.clone()));

    let refused = |norm: ImageNormalization, out: &str| {
        let mut opts = pack_opts(&xp, &yp, &tmp.path().join(out));
        opts.normalization_from = Some(norm);
        pack_images(&opts).unwrap_err().to_string()
    };
    let three = ImageNormalization {
        mean: vec![0.5; 3],
        std: vec![0.25; 3],
        ..given.clone()
    };
    let e = refused(three, "three");
    assert!(
        e.contains("the given normalization has 3 channels, the images 1"),
        "{e}"
    );
    let floats = ImageNormalization {
        scale: 1.0,
        ..given
    };
    let e = refused(floats, "floats");
    assert!(
        e.contains("reads pixels scaled by 1 (f32), these images are u8"),
        "{e}"
    );
}

#[test]
fn channels_last_and_3d_arrays_are_packed_as_chw() {
    let tmp = tempfile::tempdir().unwrap();
    let (xp, yp) = files(tmp.path());
    // Two [H=2, W=3, C=2] images: value = 100·n + 10·c + (h·3 + w).
    let mut hwc = Vec::new();
    for n in 0..2u8 {
        for h in 0..2u8 {
            for w in 0..3u8 {
                for c in 0..2u8 {
                    hwc.push(100 * n + 10 * c + h * 3 + w);
                }
            }
        }
    }
    write_npy_u8(&xp, &[2, 2, 3, 2], &hwc);
    npyz::to_file_1d(&yp, [0i64, 1]).unwrap();
    let mut opts = pack_opts(&xp, &yp, &tmp.path().join("a"));
    opts.channels_last = true;
    opts.normalize = false;
    let report = pack_images(&opts).unwrap();
    assert_eq!((report.shape, report.dtype), ([2, 2, 3], ElementType::U8));
    let ds = Dataset::load(&tmp.path().join("a/train")).unwrap();
    let chw: Vec<f32> = (0..2u8)
        .flat_map(|n| {
            (0..2u8).flat_map(move |c| (0..6u8).map(move |p| f32::from(100 * n + 10 * c + p)))
        })
        .collect();
    assert_eq!(ds.x, chw);

    // A Fortran-order array reads as the same images.
    let chw_u8: Vec<u8> = chw.iter().map(|&v| v as u8).collect();
    let mut fortran = vec![0u8; chw_u8.len()];
    let dims = [2usize, 2, 2, 3];
    for (i, &v) in chw_u8.iter().enumerate() {
        let idx = [i / 12, (i / 6) % 2, (i / 3) % 2, i % 3];
        let f = idx[0] + dims[0] * (idx[1] + dims[1] * (idx[2] + dims[2] * idx[3]));
        fortran[f] = v;
    }
    let mut w = npyz::WriteOptions::new()
        .default_dtype()
        .order(npyz::Order::Fortran)
        .shape(&[2, 2, 2, 3])
        .writer(std::fs::File::create(&xp).unwrap())
        .begin_nd()
        .unwrap();
    w.extend(fortran).unwrap();
    w.finish().unwrap();
    let mut opts = pack_opts(&xp, &yp, &tmp.path().join("f"));
    opts.normalize = false;
    pack_images(&opts).unwrap();
    assert_eq!(Dataset::load(&tmp.path().join("f/train")).unwrap().x, chw);

    // A 3-D array is one channel; float64 is stored as f32.
    write_npy_f64(&xp, &[2, 2, 2], &[0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0]);
    let mut opts = pack_opts(&xp, &yp, &tmp.path().join("b"));
    opts.normalize = false;
    let report = pack_images(&opts).unwrap();
    assert_eq!((report.shape, report.dtype), ([1, 2, 2], ElementType::F32));
    let ds = Dataset::load(&tmp.path().join("b/train")).unwrap();
    assert_eq!(ds.x, [0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0]);
    let m = DatasetManifest::read(&tmp.path().join("b/train")).unwrap();
    assert_eq!(m.schema.features.dtype, ElementType::F32);
    assert_eq!(m.schema.features.shape, [1, 2, 2]);
}

#[test]
fn bad_image_arrays_are_refused_with_their_text() {
    let tmp = tempfile::tempdir().unwrap();
    let (xp, yp) = files(tmp.path());
    npyz::to_file_1d(&yp, [0i64, 1]).unwrap();
    let err = |opts: &ImageOptions| pack_images(opts).unwrap_err().to_string();
    let out = tmp.path().join("o");

    write_npy_u8(&xp, &[2, 4], &[0; 8]);
    assert_eq!(
        err(&pack_opts(&xp, &yp, &out)),
        format!(
            "{}: images must be a 4-D [n, C, H, W] or 3-D [n, H, W] array, found shape [2, 4] \
             (channels-last [n, H, W, C] needs --channels-last)",
            xp.display()
        )
    );
    write_npy_u8(&xp, &[2, 2, 2], &[0; 8]);
    let mut opts = pack_opts(&xp, &yp, &out);
    opts.channels_last = true;
    assert_eq!(
        err(&opts),
        format!(
            "{}: --channels-last needs a 4-D [n, H, W, C] array, found shape [2, 2, 2]",
            xp.display()
        )
    );
    write_npy_u8(&xp, &[2, 1, 0, 2], &[]);
    assert_eq!(
        err(&pack_opts(&xp, &yp, &out)),
        format!(
            "{}: images of shape [C, H, W] = [1, 0, 2] have a zero side",
            xp.display()
        )
    );
    let mut w = npyz::WriteOptions::new()
        .default_dtype()
        .shape(&[2, 1, 2])
        .writer(std::fs::File::create(&xp).unwrap())
        .begin_nd()
        .unwrap();
    w.extend([1i32, 2, 3, 4]).unwrap();
    w.finish().unwrap();
    assert_eq!(
        err(&pack_opts(&xp, &yp, &out)),
        format!(
            "{}: images must be uint8, float32 or float64, found <i4",
            xp.display()
        )
    );
    write_npy_f64(&xp, &[2, 1, 2], &[0.0, 1.0, f64::NAN, 2.0]);
    assert_eq!(
        err(&pack_opts(&xp, &yp, &out)),
        format!(
            "{}: image 1 has a non-finite value at channel 0, row 0, column 0",
            xp.display()
        )
    );
    write_npy_u8(&xp, &[3, 1, 2], &[0; 6]);
    assert_eq!(
        err(&pack_opts(&xp, &yp, &out)),
        format!(
            "{} has 3 rows but {} has 2 labels",
            xp.display(),
            yp.display()
        )
    );
    assert!(!out.exists(), "a refused pack writes nothing");
}

/// Writes a small u8 image dataset with normalization and returns its dir.
fn image_dataset(tmp: &Path) -> PathBuf {
    let dir = tmp.join("ds");
    let norm = ImageNormalization {
        scale: 1.0 / 255.0,
        mean: vec![0.5, 0.5],
        std: vec![0.25, 0.25],
    };
    let opts = image_opts([2, 1, 2], ElementType::U8, Some(norm));
    write_dataset_rows(
        &dir,
        &opts,
        FeatureRows::U8(&[1, 2, 3, 4, 5, 6, 7, 8]),
        LabelRows::Classes(&[0, 1]),
    )
    .unwrap();
    dir
}

#[track_caller]
fn check_manifest_error(edit: impl FnOnce(&mut serde_json::Value), expected: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = image_dataset(tmp.path());
    let path = dir.join("MANIFEST.json");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&path, serde_json::to_vec(&v).unwrap()).unwrap();
    let err = DatasetManifest::read(&dir).unwrap_err().to_string();
    assert_eq!(err, format!("invalid manifest: {expected}"));
}

#[test]
fn bad_image_schemas_and_normalizations_are_refused() {
    check_manifest_error(
        |v| v["image_normalization"]["mean"] = serde_json::json!([0.5]),
        "image_normalization has 1 means and 2 stds for 2 channels",
    );
    check_manifest_error(
        |v| v["image_normalization"]["std"] = serde_json::json!([0.25, 0.0]),
        "image_normalization std of channel 1 is 0; it must be finite and positive",
    );
    check_manifest_error(
        |v| v["image_normalization"]["scale"] = serde_json::json!(-1.0),
        "image_normalization scale must be finite and positive, found -1",
    );
    check_manifest_error(
        |v| v["schema"]["features"]["shape"] = serde_json::json!([4]),
        "u8 features need an image shape [C, H, W]; flat features `[d]` are f32",
    );
    check_manifest_error(
        |v| v["schema"]["features"]["shape"] = serde_json::json!([2, 2]),
        "schema tensor `x` must have shape [d] or, for images, [C, H, W]; found 2 dims [2, 2]",
    );
    check_manifest_error(
        |v| v["schema"]["features"]["shape"] = serde_json::json!([2, 0, 2]),
        "image shape [2, 0, 2] has a zero side (dimension 1); [C, H, W] must all be positive",
    );
    check_manifest_error(
        |v| v["schema"]["features"]["dtype"] = "i64".into(),
        "schema tensor `x` must be f32 (or u8 for images), not i64",
    );
    check_manifest_error(
        |v| {
            v["schema"]["features"] = serde_json::json!({"name": "x", "dtype": "f32", "shape": [4]})
        },
        "image_normalization applies only to images (`x` of shape [C, H, W])",
    );
    check_manifest_error(
        |v| {
            v["standardization"] =
                serde_json::json!({"mean": [0.0, 0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0, 1.0]})
        },
        "standardization does not apply to u8 images (their stored values cannot hold \
         standardized ones); record image_normalization instead",
    );

    // A shard whose x is f32 where the schema says u8 is refused on read.
    let tmp = tempfile::tempdir().unwrap();
    let dir = image_dataset(tmp.path());
    let mut v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("MANIFEST.json")).unwrap()).unwrap();
    v["schema"]["features"]["dtype"] = "f32".into();
    std::fs::write(dir.join("MANIFEST.json"), serde_json::to_vec(&v).unwrap()).unwrap();
    let err = Dataset::load(&dir).unwrap_err().to_string();
    assert!(
        err.ends_with("tensor `x` is U8 [2, 2, 1, 2], the schema requires F32 [2, 2, 1, 2]"),
        "{err}"
    );
}

#[test]
fn flat_manifests_written_before_images_read_unchanged() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("flat");
    let x = [1.0f32, 2.0, 3.0, 4.0];
    let opts = WriteOptions {
        name: "flat".into(),
        features: 2,
        labels: LabelKind::Classes(2),
        shard_samples: 8,
        standardization: None,
        source: None,
        image: None,
        tokenizer: None,
    };
    write_dataset_rows(
        &dir,
        &opts,
        FeatureRows::F32(&x),
        LabelRows::Classes(&[0, 1]),
    )
    .unwrap();
    let text = std::fs::read_to_string(dir.join("MANIFEST.json")).unwrap();
    // The flat schema is written as before: no image fields appear.
    assert!(!text.contains("image"), "{text}");
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        json["schema"]["features"],
        serde_json::json!({"name": "x", "dtype": "f32", "shape": [2]})
    );
    let m = DatasetManifest::read(&dir).unwrap();
    assert_eq!((m.features(), m.image_shape()), (2, None));
    let (dtype, shape, _) = stored_x(&dir, 0);
    assert_eq!((dtype, shape), (safetensors::Dtype::F32, vec![2, 2]));
    assert_eq!(Dataset::load(&dir).unwrap().x, x);
}
