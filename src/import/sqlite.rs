//! gearmand's `libsqlite3` queue: one table (default `gearman_queue`, `--libsqlite3-table`)
//! created by gearmand 1.1.20 as
//! `(unique_key TEXT, function_name TEXT, priority INTEGER, data BLOB, when_to_run INTEGER,
//! PRIMARY KEY (unique_key, function_name))`. Priority is 0 HIGH, 1 NORMAL, 2 LOW; a
//! `when_to_run` of 0 means "no epoch". Rows are deleted by their primary key, one transaction
//! per window of acknowledged jobs.

use std::path::Path;

use rusqlite::{params, Connection, OpenFlags};

use super::{priority_from_gearmand, ImportError, Source, SourceJob};

/// gearmand's default `--libsqlite3-table`.
pub const DEFAULT_TABLE: &str = "gearman_queue";

/// An open gearmand sqlite queue.
pub struct SqliteQueue {
    db: Connection,
    file: String,
    table: String,
}

impl SqliteQueue {
    /// Opens an existing queue file (never creates one: a wrong path is an error, not an
    /// empty import).
    pub fn open(file: &Path, table: &str) -> Result<SqliteQueue, ImportError> {
        let name = file.display().to_string();
        let db = Connection::open_with_flags(
            file,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|source| ImportError::Sqlite {
            file: name.clone(),
            source,
        })?;
        Ok(SqliteQueue {
            db,
            file: name,
            table: table.to_string(),
        })
    }

    fn err(&self, source: rusqlite::Error) -> ImportError {
        ImportError::Sqlite {
            file: self.file.clone(),
            source,
        }
    }

    /// Every queued job, in gearmand's insertion order (rowid).
    pub fn jobs(&self) -> Result<Vec<SourceJob>, ImportError> {
        let sql = format!(
            "SELECT function_name, unique_key, data, priority, when_to_run FROM {} ORDER BY rowid",
            quote(&self.table)
        );
        let mut stmt = self.db.prepare(&sql).map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |r| {
                let epoch: Option<i64> = r.get(4)?;
                Ok(SourceJob {
                    function: text_or_blob(r, 0)?,
                    unique: text_or_blob(r, 1)?,
                    data: text_or_blob(r, 2)?,
                    priority: priority_from_gearmand(r.get::<_, Option<i64>>(3)?.unwrap_or(1)),
                    epoch: epoch.filter(|&e| e > 0).map(|e| e as u64),
                })
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.err(e))
    }
}

impl Source for SqliteQueue {
    fn delete(&mut self, jobs: &[&SourceJob]) -> Result<(), ImportError> {
        if jobs.is_empty() {
            return Ok(());
        }
        let sql = format!(
            "DELETE FROM {} WHERE unique_key = CAST(?1 AS TEXT) AND function_name = CAST(?2 AS TEXT)",
            quote(&self.table)
        );
        let tx = self
            .db
            .transaction()
            .map_err(|source| ImportError::Sqlite {
                file: self.file.clone(),
                source,
            })?;
        {
            let mut stmt = tx
                .prepare_cached(&sql)
                .map_err(|source| ImportError::Sqlite {
                    file: self.file.clone(),
                    source,
                })?;
            for j in jobs {
                // gearmand binds both keys as TEXT; the bytes are cast to TEXT unchanged, so
                // a key that is not UTF-8 still matches its row.
                stmt.execute(params![j.unique, j.function])
                    .map_err(|source| ImportError::Sqlite {
                        file: self.file.clone(),
                        source,
                    })?;
            }
        }
        tx.commit().map_err(|e| self.err(e))
    }

    fn remaining(&mut self) -> Result<u64, ImportError> {
        let sql = format!("SELECT COUNT(*) FROM {}", quote(&self.table));
        self.db
            .query_row(&sql, [], |r| r.get::<_, i64>(0))
            .map(|n| n as u64)
            .map_err(|e| self.err(e))
    }
}

/// gearmand binds unique and function as TEXT and data as BLOB, but a hand-edited table may
/// hold either: take the bytes of whichever it is.
fn text_or_blob(r: &rusqlite::Row<'_>, i: usize) -> rusqlite::Result<Vec<u8>> {
    use rusqlite::types::ValueRef;
    Ok(match r.get_ref(i)? {
        ValueRef::Text(t) | ValueRef::Blob(t) => t.to_vec(),
        ValueRef::Null => Vec::new(),
        ValueRef::Integer(n) => n.to_string().into_bytes(),
        ValueRef::Real(x) => x.to_string().into_bytes(),
    })
}

/// A table name as an SQL identifier (the name comes from the command line).
fn quote(table: &str) -> String {
    format!("\"{}\"", table.replace('"', "\"\""))
}
