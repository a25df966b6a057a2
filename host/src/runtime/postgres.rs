//! Host implementation of `spin:postgres/postgres@3.0.0` on a pool of
//! `tokio-postgres` connections.
//!
//! Every value type of the interface is mapped: parameters convert to the
//! type the statement expects (with range checks), and result columns of the
//! interface's types come back typed. Columns of other Postgres types return
//! `unsupported`, so a guest casts them to text in SQL. Failures return the
//! interface's `error` value; only a host bug traps.

use std::error::Error as StdError;

use bytes::BytesMut;
use chrono::{DateTime, Datelike, NaiveDate, NaiveDateTime, NaiveTime, Timelike, Utc};
use tokio_postgres::types::{to_sql_checked, IsNull, ToSql, Type};
use tokio_postgres::Row;
use tracing::warn;
use wasmtime::component::Resource;

use super::bindings::postgres::{self as wit, Column, DbDataType, DbValue, ParameterValue, RowSet};
use super::state::{State, MAX_OPEN_CONNECTIONS};

/// A `connection` resource: one connection taken from the pool, returned to
/// it when the guest drops the resource or the instance ends.
pub struct PgConnection {
    /// Out of the table only while a call runs.
    client: Option<deadpool_postgres::Object>,
}

type WitResult<T> = wasmtime::Result<Result<T, wit::Error>>;

/// A parameter that converts itself to the type Postgres infers for it.
#[derive(Debug)]
struct Param(ParameterValue);

type BoxError = Box<dyn StdError + Sync + Send>;

fn mismatch(value: &ParameterValue, ty: &Type) -> BoxError {
    format!("cannot pass {} as Postgres type {ty}", kind(value)).into()
}

fn kind(value: &ParameterValue) -> &'static str {
    match value {
        ParameterValue::Boolean(_) => "boolean",
        ParameterValue::Int8(_) => "int8",
        ParameterValue::Int16(_) => "int16",
        ParameterValue::Int32(_) => "int32",
        ParameterValue::Int64(_) => "int64",
        ParameterValue::Floating32(_) => "floating32",
        ParameterValue::Floating64(_) => "floating64",
        ParameterValue::Str(_) => "str",
        ParameterValue::Binary(_) => "binary",
        ParameterValue::Date(_) => "date",
        ParameterValue::Time(_) => "time",
        ParameterValue::Datetime(_) => "datetime",
        ParameterValue::Timestamp(_) => "timestamp",
        ParameterValue::DbNull => "db-null",
    }
}

fn integer(value: &ParameterValue) -> Option<i64> {
    match value {
        ParameterValue::Int8(n) => Some(i64::from(*n)),
        ParameterValue::Int16(n) => Some(i64::from(*n)),
        ParameterValue::Int32(n) => Some(i64::from(*n)),
        ParameterValue::Int64(n) => Some(*n),
        _ => None,
    }
}

fn to_date((year, month, day): (i32, u8, u8)) -> Result<NaiveDate, BoxError> {
    NaiveDate::from_ymd_opt(year, month.into(), day.into())
        .ok_or_else(|| format!("invalid date {year}-{month}-{day}").into())
}

fn to_time((hour, minute, second, nanos): (u8, u8, u8, u32)) -> Result<NaiveTime, BoxError> {
    NaiveTime::from_hms_nano_opt(hour.into(), minute.into(), second.into(), nanos)
        .ok_or_else(|| format!("invalid time {hour}:{minute}:{second}.{nanos}").into())
}

fn to_datetime(
    (year, month, day, hour, minute, second, nanos): (i32, u8, u8, u8, u8, u8, u32),
) -> Result<NaiveDateTime, BoxError> {
    Ok(to_date((year, month, day))?.and_time(to_time((hour, minute, second, nanos))?))
}

impl ToSql for Param {
    fn to_sql(&self, ty: &Type, out: &mut BytesMut) -> Result<IsNull, BoxError> {
        let value = &self.0;
        if let ParameterValue::DbNull = value {
            return Ok(IsNull::Yes);
        }
        if let Some(number) = integer(value) {
            return match *ty {
                Type::INT2 => i16::try_from(number)?.to_sql(ty, out),
                Type::INT4 => i32::try_from(number)?.to_sql(ty, out),
                Type::INT8 => number.to_sql(ty, out),
                Type::CHAR => i8::try_from(number)?.to_sql(ty, out),
                Type::FLOAT8 => (number as f64).to_sql(ty, out),
                _ => Err(mismatch(value, ty)),
            };
        }
        match (value, ty) {
            (ParameterValue::Boolean(flag), &Type::BOOL) => flag.to_sql(ty, out),
            (ParameterValue::Floating32(n), &Type::FLOAT4) => n.to_sql(ty, out),
            (ParameterValue::Floating32(n), &Type::FLOAT8) => f64::from(*n).to_sql(ty, out),
            (ParameterValue::Floating64(n), &Type::FLOAT8) => n.to_sql(ty, out),
            (ParameterValue::Str(text), _) if <&str as ToSql>::accepts(ty) => {
                text.as_str().to_sql(ty, out)
            }
            (ParameterValue::Binary(bytes), &Type::BYTEA) => bytes.to_sql(ty, out),
            (ParameterValue::Date(date), &Type::DATE) => to_date(*date)?.to_sql(ty, out),
            (ParameterValue::Time(time), &Type::TIME) => to_time(*time)?.to_sql(ty, out),
            (ParameterValue::Datetime(datetime), &Type::TIMESTAMP) => {
                to_datetime(*datetime)?.to_sql(ty, out)
            }
            (ParameterValue::Datetime(datetime), &Type::TIMESTAMPTZ) => {
                to_datetime(*datetime)?.and_utc().to_sql(ty, out)
            }
            (ParameterValue::Timestamp(seconds), &Type::TIMESTAMPTZ) => {
                DateTime::<Utc>::from_timestamp(*seconds, 0)
                    .ok_or("timestamp out of range")?
                    .to_sql(ty, out)
            }
            (ParameterValue::Timestamp(seconds), &Type::TIMESTAMP) => {
                DateTime::<Utc>::from_timestamp(*seconds, 0)
                    .ok_or("timestamp out of range")?
                    .naive_utc()
                    .to_sql(ty, out)
            }
            (ParameterValue::Timestamp(seconds), &Type::INT8) => seconds.to_sql(ty, out),
            _ => Err(mismatch(value, ty)),
        }
    }

    fn accepts(_ty: &Type) -> bool {
        // Conversion is checked per value in `to_sql`, with a clear error.
        true
    }

    to_sql_checked!();
}

fn data_type(ty: &Type) -> DbDataType {
    match *ty {
        Type::BOOL => DbDataType::Boolean,
        Type::CHAR => DbDataType::Int8,
        Type::INT2 => DbDataType::Int16,
        Type::INT4 => DbDataType::Int32,
        Type::INT8 => DbDataType::Int64,
        Type::FLOAT4 => DbDataType::Floating32,
        Type::FLOAT8 => DbDataType::Floating64,
        Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME => DbDataType::Str,
        Type::BYTEA => DbDataType::Binary,
        Type::DATE => DbDataType::Date,
        Type::TIME => DbDataType::Time,
        Type::TIMESTAMP | Type::TIMESTAMPTZ => DbDataType::Datetime,
        _ => DbDataType::Other,
    }
}

fn date_tuple(date: NaiveDate) -> (i32, u8, u8) {
    // Month and day always fit in u8.
    (date.year(), date.month() as u8, date.day() as u8)
}

fn time_tuple(time: NaiveTime) -> (u8, u8, u8, u32) {
    (
        time.hour() as u8,
        time.minute() as u8,
        time.second() as u8,
        time.nanosecond(),
    )
}

fn datetime_tuple(datetime: NaiveDateTime) -> (i32, u8, u8, u8, u8, u8, u32) {
    let (year, month, day) = date_tuple(datetime.date());
    let (hour, minute, second, nanos) = time_tuple(datetime.time());
    (year, month, day, hour, minute, second, nanos)
}

fn column_value(row: &Row, index: usize, ty: &Type) -> Result<DbValue, tokio_postgres::Error> {
    macro_rules! read {
        ($rust:ty, $wrap:expr) => {
            row.try_get::<_, Option<$rust>>(index)?
                .map_or(DbValue::DbNull, $wrap)
        };
    }
    Ok(match *ty {
        Type::BOOL => read!(bool, DbValue::Boolean),
        Type::CHAR => read!(i8, DbValue::Int8),
        Type::INT2 => read!(i16, DbValue::Int16),
        Type::INT4 => read!(i32, DbValue::Int32),
        Type::INT8 => read!(i64, DbValue::Int64),
        Type::FLOAT4 => read!(f32, DbValue::Floating32),
        Type::FLOAT8 => read!(f64, DbValue::Floating64),
        Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME => read!(String, DbValue::Str),
        Type::BYTEA => read!(Vec<u8>, DbValue::Binary),
        Type::DATE => read!(NaiveDate, |d| DbValue::Date(date_tuple(d))),
        Type::TIME => read!(NaiveTime, |t| DbValue::Time(time_tuple(t))),
        Type::TIMESTAMP => read!(NaiveDateTime, |dt| DbValue::Datetime(datetime_tuple(dt))),
        Type::TIMESTAMPTZ => read!(DateTime<Utc>, |dt: DateTime<Utc>| {
            DbValue::Datetime(datetime_tuple(dt.naive_utc()))
        }),
        _ => DbValue::Unsupported,
    })
}

fn map_error(component: &str, error: tokio_postgres::Error) -> wit::Error {
    let message = match error.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        None => error.to_string(),
    };
    if error.is_closed() {
        warn!(component, cause = %message, "postgres connection closed");
        return wit::Error::ConnectionFailed(message);
    }
    if error.as_db_error().is_none() && message.starts_with("error serializing parameter") {
        return wit::Error::BadParameter(message);
    }
    wit::Error::QueryFailed(message)
}

/// Result of a statement: rows for `query`, a count for `execute`.
enum Outcome {
    Rows(tokio_postgres::Statement, Vec<Row>),
    Count(u64),
}

impl State {
    async fn pg_run(
        &mut self,
        handle: &Resource<PgConnection>,
        statement: String,
        params: Vec<ParameterValue>,
        execute_only: bool,
    ) -> WitResult<Outcome> {
        let component = self.component.id.clone();
        let params: Vec<Param> = params.into_iter().map(Param).collect();
        // The client leaves the table while the call runs, because `timed`
        // borrows the state mutably. The guest is blocked meanwhile, so no
        // other call can look for it.
        let client = self
            .table
            .get_mut(handle)?
            .client
            .take()
            .ok_or_else(|| wasmtime::format_err!("postgres connection is already in use"))?;
        let future = async {
            let prepared = client.prepare_cached(&statement).await?;
            let refs: Vec<&(dyn ToSql + Sync)> = params
                .iter()
                .map(|param| param as &(dyn ToSql + Sync))
                .collect();
            if execute_only {
                Ok::<_, tokio_postgres::Error>(Outcome::Count(
                    client.execute(&prepared, &refs).await?,
                ))
            } else {
                let rows = client.query(&prepared, &refs).await?;
                Ok(Outcome::Rows(prepared, rows))
            }
        };
        let result = self.timed(future).await;
        self.table.get_mut(handle)?.client = Some(client);
        if !matches!(result, Ok(Ok(_))) {
            self.backends.metrics.storage_error("postgres");
        }
        Ok(match result {
            Ok(Ok(outcome)) => Ok(outcome),
            Ok(Err(error)) => Err(map_error(&component, error)),
            Err(_) => Err(wit::Error::QueryFailed(
                "postgres call timed out".to_string(),
            )),
        })
    }
}

fn row_set(prepared: &tokio_postgres::Statement, rows: &[Row]) -> Result<RowSet, wit::Error> {
    let columns: Vec<Column> = prepared
        .columns()
        .iter()
        .map(|column| Column {
            name: column.name().to_string(),
            data_type: data_type(column.type_()),
        })
        .collect();
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let mut values = Vec::with_capacity(columns.len());
        for (index, column) in prepared.columns().iter().enumerate() {
            let value = column_value(row, index, column.type_()).map_err(|error| {
                wit::Error::ValueConversionFailed(format!("column {}: {error}", column.name()))
            })?;
            values.push(value);
        }
        out.push(values);
    }
    Ok(RowSet { columns, rows: out })
}

impl wit::Host for State {}

impl wit::HostConnection for State {
    async fn open(&mut self, address: String) -> WitResult<Resource<PgConnection>> {
        if let Err(reason) = self.component.outbound.check_url(&address) {
            warn!(component = %self.component.id, %reason, "postgres address rejected");
            return Ok(Err(wit::Error::ConnectionFailed(reason)));
        }
        if self.open_connections >= MAX_OPEN_CONNECTIONS {
            return Ok(Err(wit::Error::ConnectionFailed(
                "too many open connections in one instance".to_string(),
            )));
        }
        let backends = self.backends.clone();
        let future = async move {
            let pool = backends.postgres(&address).await?;
            Ok::<_, anyhow::Error>(pool.get().await?)
        };
        let client = match self.timed(future).await {
            Ok(Ok(client)) => client,
            Ok(Err(error)) => {
                self.backends.metrics.storage_error("postgres");
                warn!(component = %self.component.id, cause = %format!("{error:#}"), "postgres connect failed");
                return Ok(Err(wit::Error::ConnectionFailed(format!("{error:#}"))));
            }
            Err(_) => {
                return Ok(Err(wit::Error::ConnectionFailed(
                    "timed out connecting to postgres".to_string(),
                )))
            }
        };
        self.open_connections += 1;
        Ok(Ok(self.table.push(PgConnection {
            client: Some(client),
        })?))
    }

    async fn query(
        &mut self,
        handle: Resource<PgConnection>,
        statement: String,
        params: Vec<ParameterValue>,
    ) -> WitResult<RowSet> {
        Ok(
            match self.pg_run(&handle, statement, params, false).await? {
                Ok(Outcome::Rows(prepared, rows)) => row_set(&prepared, &rows),
                Ok(Outcome::Count(_)) => Ok(RowSet {
                    columns: Vec::new(),
                    rows: Vec::new(),
                }),
                Err(error) => Err(error),
            },
        )
    }

    async fn execute(
        &mut self,
        handle: Resource<PgConnection>,
        statement: String,
        params: Vec<ParameterValue>,
    ) -> WitResult<u64> {
        Ok(match self.pg_run(&handle, statement, params, true).await? {
            Ok(Outcome::Count(count)) => Ok(count),
            Ok(Outcome::Rows(_, rows)) => Ok(rows.len() as u64),
            Err(error) => Err(error),
        })
    }

    async fn drop(&mut self, handle: Resource<PgConnection>) -> wasmtime::Result<()> {
        self.table.delete(handle)?;
        Ok(())
    }
}
