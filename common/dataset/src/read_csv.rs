//! Reading a CSV table (plain or gzip, detected by its magic bytes) of numeric
//! features and one integer label column into raw samples, with errors that
//! point at `file:line: column`. Leading lines that are not part of the table
//! (scikit-learn's `breast_cancer.csv` starts with `569,30,malignant,benign`)
//! can be skipped. Splitting, standardizing and writing happen in `pack.rs`.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use flate2::read::MultiGzDecoder;
use indicatif::ProgressBar;

use super::DatasetError;
use super::manifest::{MAX_CLASSES, MAX_FEATURES};
use super::pack::{LabelColumn, RawSamples, parse_label};

const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];
/// Rows between progress bar updates: the bar is cheap, but not free per row.
const PROGRESS_EVERY: u64 = 1024;

/// Reads `path` after skipping its first `skip_rows` lines. `has_header:
/// None` treats the first row after those as a header when any of its fields
/// is not a number. Lines in errors count from the top of the file, skipped
/// ones included; columns are 1-based; [`LabelColumn::Index`] is 0-based.
pub(crate) fn read_csv(
    path: &Path,
    label_column: &LabelColumn,
    has_header: Option<bool>,
    skip_rows: usize,
    progress: &ProgressBar,
) -> Result<RawSamples, DatasetError> {
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
    if fields < 2 {
        return Err(DatasetError::InvalidInput(format!(
            "{}: a row needs at least one feature and a label, found {fields} field",
            path.display()
        )));
    }
    let header = has_header.unwrap_or_else(|| record.iter().any(|f| f.parse::<f64>().is_err()));
    let label = resolve_label_column(path, label_column, &record, header)?;
    let header_line = line_of(&record, skipped);

    let mut samples = RawSamples {
        x: Vec::new(),
        y: Vec::new(),
        features: fields - 1,
        description: format!(
            "{} (csv{}{}, {} header, label column {} of {fields})",
            path.display(),
            if gzip { ", gzip" } else { "" },
            match skip_rows {
                0 => String::new(),
                1 => ", first line skipped".to_owned(),
                n => format!(", first {n} lines skipped"),
            },
            if header { "with" } else { "no" },
            label + 1
        ),
    };
    if !header {
        push_row(path, &record, fields, label, skipped, &mut samples)?;
    }
    while csv.read_record(&mut record).map_err(syntax)? {
        // A header whose width no row shares is usually a preamble line
        // (counts, class names) taken for one: say so rather than only
        // counting fields.
        if header && samples.y.is_empty() && record.len() != fields {
            return Err(DatasetError::CsvHeaderMismatch {
                path: path.into(),
                line: line_of(&record, skipped),
                found: record.len(),
                header_line,
                expected: fields,
            });
        }
        push_row(path, &record, fields, label, skipped, &mut samples)?;
        if (samples.y.len() as u64).is_multiple_of(PROGRESS_EVERY) {
            progress.set_position(samples.y.len() as u64);
        }
    }
    progress.set_position(samples.y.len() as u64);
    if samples.y.is_empty() {
        return Err(DatasetError::EmptyInput { path: path.into() });
    }
    Ok(samples)
}

/// The 0-based index of the label column among `fields` (the first record).
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
    label: usize,
    skipped: u64,
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
        if i == label {
            let value = parse_label(field).ok_or_else(|| DatasetError::CsvBadLabel {
                path: path.into(),
                line,
                column: i + 1,
                value: field.into(),
                limit: MAX_CLASSES,
            })?;
            out.y.push(value);
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
        out.x.push(value);
    }
    Ok(())
}
