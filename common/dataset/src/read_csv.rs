//! Reading a CSV table (plain or gzip, detected by its magic bytes; comma,
//! space, tab or another one-byte delimiter) of numeric features and one
//! integer label column, or for regression one or more float target
//! columns, into raw samples, with errors that point at `file:line: column`.
//! Labels may also come from a second table of the same rows (scikit-learn's
//! diabetes data keeps its target in `diabetes_target.csv.gz`). Leading lines
//! that are not part of the table (scikit-learn's `breast_cancer.csv` starts
//! with `569,30,malignant,benign`) can be skipped. Splitting, standardizing
//! and writing happen in `pack.rs`.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use flate2::read::MultiGzDecoder;
use indicatif::ProgressBar;

use super::DatasetError;
use super::manifest::{MAX_CLASSES, MAX_FEATURES, MAX_TARGETS};
use super::pack::{LabelColumn, PackTask, RawSamples, parse_label};
use super::shards::Labels;

/// Which columns of a table are labels (or targets); the others are features.
pub(crate) enum Columns<'a> {
    /// The columns `LabelColumn` names.
    Labels(&'a LabelColumn),
    /// Every column is a feature (labels come from another file).
    AllFeatures,
    /// Every column is a label or target (the other file's features).
    AllLabels,
}

/// How to read one table.
pub(crate) struct Table<'a> {
    pub path: &'a Path,
    pub columns: Columns<'a>,
    pub has_header: Option<bool>,
    pub skip_rows: usize,
    pub delimiter: u8,
    pub task: PackTask,
    /// Missing fields (empty, `NA`, `NaN`, `null`, `none`) are kept as markers for `pack` to
    /// drop or fill, instead of being an error.
    pub keep_missing: bool,
}

/// Whether a field stands for a missing value.
pub(crate) fn is_missing(field: &str) -> bool {
    matches!(
        field.trim().to_ascii_lowercase().as_str(),
        "" | "na" | "nan" | "null" | "none"
    )
}

/// The class label recorded for a missing one (`pack` drops its row).
pub(crate) const MISSING_LABEL: i64 = -1;

const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];
/// Rows between progress bar updates: the bar is cheap, but not free per row.
const PROGRESS_EVERY: u64 = 1024;

/// Reads `path` after skipping its first `skip_rows` lines. `has_header:
/// None` treats the first row after those as a header when any of its fields
/// is not a number. Lines in errors count from the top of the file, skipped
/// ones included; columns are 1-based; [`LabelColumn::Index`] is 0-based.
pub(crate) fn read_csv(t: &Table<'_>, progress: &ProgressBar) -> Result<RawSamples, DatasetError> {
    let Table {
        path,
        has_header,
        skip_rows,
        ..
    } = *t;
    let read_err = |source| DatasetError::Read {
        path: path.into(),
        source,
    };
    let mut reader = BufReader::new(File::open(path).map_err(read_err)?);
    let gzip = reader
        .fill_buf()
        .map_err(read_err)?
        .starts_with(&GZIP_MAGIC);
    let input: Box<dyn Read> = if gzip {
        Box::new(MultiGzDecoder::new(reader))
    } else {
        Box::new(reader)
    };
    let mut input = BufReader::new(input);
    // Whole lines, not CSV records: what precedes the table need not be CSV.
    let mut discard = Vec::new();
    for skipped in 0..skip_rows {
        discard.clear();
        if input.read_until(b'\n', &mut discard).map_err(read_err)? == 0 {
            return Err(DatasetError::InvalidInput(format!(
                "{}: skipping {skip_rows} leading lines leaves no data: the file has {skipped}",
                path.display()
            )));
        }
    }
    let skipped = skip_rows as u64;
    let mut csv = csv::ReaderBuilder::new()
        .has_headers(false)
        .delimiter(t.delimiter)
        // Field counts are checked here, to report them with the line.
        .flexible(true)
        .trim(csv::Trim::All)
        .from_reader(input);
    let syntax = |source| DatasetError::CsvSyntax {
        path: path.into(),
        source,
    };

    let mut record = csv::StringRecord::new();
    if !csv.read_record(&mut record).map_err(syntax)? {
        return Err(DatasetError::EmptyInput { path: path.into() });
    }
    let fields = record.len();
    if fields as u64 > MAX_FEATURES + 1 {
        return Err(DatasetError::TooLarge {
            what: "csv fields per row",
            value: fields as u64,
            limit: MAX_FEATURES + 1,
        });
    }
    let needed = match t.columns {
        Columns::Labels(_) => 2,
        Columns::AllFeatures | Columns::AllLabels => 1,
    };
    // One field of numbers separated by blanks is a table in another
    // delimiter: say so rather than fail on the first number.
    if fields == 1
        && let Some(f) = record.get(0)
        && let Some(blank) = [' ', '\t'].into_iter().find(|&b| f.contains(b))
        && u8::try_from(blank).ok() != Some(t.delimiter)
        && f.split(blank)
            .filter(|p| !p.is_empty())
            .all(|p| p.parse::<f64>().is_ok())
    {
        return Err(DatasetError::InvalidInput(format!(
            "{}: the first row is one field of numbers separated by {}: give --delimiter {}",
            path.display(),
            if blank == ' ' { "spaces" } else { "tabs" },
            if blank == ' ' { "space" } else { "tab" },
        )));
    }
    if fields < needed {
        return Err(DatasetError::InvalidInput(format!(
            "{}: a row needs at least one feature and a label, found {fields} field",
            path.display()
        )));
    }
    // A missing value is not a column name: a first row with a gap is still data.
    let header = has_header.unwrap_or_else(|| {
        record
            .iter()
            .any(|f| !is_missing(f) && f.parse::<f64>().is_err())
    });
    let labels: Vec<usize> = match t.columns {
        Columns::Labels(c) => resolve_label_columns(path, c, &record, header, t.task)?,
        Columns::AllFeatures => Vec::new(),
        Columns::AllLabels => (0..fields).collect(),
    };
    if t.task == PackTask::Classification && labels.len() > 1 {
        return Err(DatasetError::LabelColumn {
            path: path.into(),
            detail: format!(
                "a classification dataset has one label column, found {}; several columns \
                 are regression targets (--task regression)",
                labels.len()
            ),
        });
    }
    if labels.len() as u64 > MAX_TARGETS {
        return Err(DatasetError::TooLarge {
            what: "target columns",
            value: labels.len() as u64,
            limit: MAX_TARGETS,
        });
    }
    let header_line = line_of(&record, skipped);
    let label_text = match labels.as_slice() {
        [] => "no label column".to_owned(),
        [one] if t.task == PackTask::Classification => format!("label column {}", one + 1),
        cols => format!(
            "target column{} {}",
            if cols.len() == 1 { "" } else { "s" },
            cols.iter()
                .map(|c| (c + 1).to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };

    let mut samples = RawSamples {
        x: Vec::new(),
        y: match t.task {
            PackTask::Classification => Labels::Classes(Vec::new()),
            PackTask::Regression => Labels::Targets {
                width: labels.len(),
                values: Vec::new(),
            },
        },
        rows: 0,
        features: fields - labels.len(),
        description: format!(
            "{} (csv{}{}{}, {} header, {label_text} of {fields})",
            path.display(),
            if gzip { ", gzip" } else { "" },
            match t.delimiter {
                b',' => String::new(),
                b' ' => ", space-delimited".to_owned(),
                b'\t' => ", tab-delimited".to_owned(),
                d => format!(", delimiter {:?}", d as char),
            },
            match skip_rows {
                0 => String::new(),
                1 => ", first line skipped".to_owned(),
                n => format!(", first {n} lines skipped"),
            },
            if header { "with" } else { "no" },
        ),
    };
    if !header {
        push_row(
            path,
            &record,
            fields,
            &labels,
            skipped,
            t.keep_missing,
            &mut samples,
        )?;
    }
    while csv.read_record(&mut record).map_err(syntax)? {
        // A header whose width no row shares is usually a preamble line
        // (counts, class names) taken for one: say so rather than only
        // counting fields.
        if header && samples.rows == 0 && record.len() != fields {
            return Err(DatasetError::CsvHeaderMismatch {
                path: path.into(),
                line: line_of(&record, skipped),
                found: record.len(),
                header_line,
                expected: fields,
            });
        }
        push_row(
            path,
            &record,
            fields,
            &labels,
            skipped,
            t.keep_missing,
            &mut samples,
        )?;
        if (samples.rows as u64).is_multiple_of(PROGRESS_EVERY) {
            progress.set_position(samples.rows as u64);
        }
    }
    progress.set_position(samples.rows as u64);
    if samples.rows == 0 {
        return Err(DatasetError::EmptyInput { path: path.into() });
    }
    Ok(samples)
}

/// The 0-based indices of the label (or target) columns among `fields`
/// (the first record), ascending and distinct; at least one feature stays.
fn resolve_label_columns(
    path: &Path,
    label_column: &LabelColumn,
    first: &csv::StringRecord,
    header: bool,
    task: PackTask,
) -> Result<Vec<usize>, DatasetError> {
    let err = |detail: String| DatasetError::LabelColumn {
        path: path.into(),
        detail,
    };
    let mut cols = match label_column {
        LabelColumn::Many(list) => list
            .iter()
            .map(|c| resolve_label_column(path, c, first, header))
            .collect::<Result<Vec<_>, _>>()?,
        one => vec![resolve_label_column(path, one, first, header)?],
    };
    cols.sort_unstable();
    if cols.windows(2).any(|w| w[0] == w[1]) {
        return Err(err("a label column is named twice".into()));
    }
    if cols.len() >= first.len() {
        return Err(err(format!(
            "{} of the {} fields are {}: no feature is left",
            cols.len(),
            first.len(),
            match task {
                PackTask::Classification => "labels",
                PackTask::Regression => "targets",
            }
        )));
    }
    Ok(cols)
}

/// The 0-based index of one label column among `fields` (the first record).
fn resolve_label_column(
    path: &Path,
    label_column: &LabelColumn,
    first: &csv::StringRecord,
    header: bool,
) -> Result<usize, DatasetError> {
    let fields = first.len();
    let err = |detail: String| DatasetError::LabelColumn {
        path: path.into(),
        detail,
    };
    match label_column {
        LabelColumn::Many(_) => Err(err("a column list cannot nest another list".into())),
        LabelColumn::First => Ok(0),
        LabelColumn::Last => Ok(fields - 1),
        LabelColumn::Index(i) if *i < fields => Ok(*i),
        LabelColumn::Index(i) => Err(err(format!(
            "label column index {i} (0-based) is past the {fields} fields of a row"
        ))),
        LabelColumn::Name(name) if !header => Err(err(format!(
            "label column `{name}` is given by name but the file has no header row"
        ))),
        LabelColumn::Name(name) => first
            .iter()
            .position(|f| f == name)
            .ok_or_else(|| err(format!("label column `{name}` is not in the header"))),
    }
}

/// The 1-based line of `record` in the file, counting the `skipped` lines the
/// CSV reader never saw.
fn line_of(record: &csv::StringRecord, skipped: u64) -> u64 {
    record.position().map_or(0, |p| p.line()) + skipped
}

fn push_row(
    path: &Path,
    record: &csv::StringRecord,
    fields: usize,
    labels: &[usize],
    skipped: u64,
    keep_missing: bool,
    out: &mut RawSamples,
) -> Result<(), DatasetError> {
    let line = line_of(record, skipped);
    if record.len() != fields {
        return Err(DatasetError::CsvFieldCount {
            path: path.into(),
            line,
            expected: fields,
            found: record.len(),
        });
    }
    for (i, field) in record.iter().enumerate() {
        let is_label = labels.binary_search(&i).is_ok();
        if keep_missing && is_missing(field) {
            match &mut out.y {
                Labels::Classes(y) if is_label => y.push(MISSING_LABEL),
                Labels::Targets { values, .. } if is_label => values.push(f32::NAN),
                _ => out.x.push(f32::NAN),
            }
            continue;
        }
        if is_missing(field) {
            return Err(DatasetError::CsvMissing {
                path: path.into(),
                line,
                column: i + 1,
                value: field.into(),
            });
        }
        if is_label && let Labels::Classes(y) = &mut out.y {
            let value = parse_label(field).ok_or_else(|| DatasetError::CsvBadLabel {
                path: path.into(),
                line,
                column: i + 1,
                value: field.into(),
                limit: MAX_CLASSES,
            })?;
            y.push(value);
            continue;
        }
        let value: f64 = field.parse().map_err(|_| DatasetError::CsvNotANumber {
            path: path.into(),
            line,
            column: i + 1,
            value: field.into(),
        })?;
        let value = value as f32;
        if !value.is_finite() {
            return Err(DatasetError::CsvNonFinite {
                path: path.into(),
                line,
                column: i + 1,
                value: field.into(),
            });
        }
        match &mut out.y {
            Labels::Targets { values, .. } if is_label => values.push(value),
            _ => out.x.push(value),
        }
    }
    out.rows += 1;
    Ok(())
}
