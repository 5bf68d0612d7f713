//! Reading typed values out of the merged TOML, each error naming its key.
//!
//! A [`Table`] is one TOML table with its key path (`nat.timeouts`,
//! `forward[2]`). Each section reads its keys by name and type; a scalar key
//! is looked up in the environment first, and an environment value is
//! parsed as the type the key is read as. [`Table::finish`] then rejects
//! any key of the table that was not read: the keys read are the only list
//! of keys there is.
use super::{
    error::{at, Kind, Reason},
    layers::{Env, EnvVar},
    ConfigError,
};

/// Where a value came from.
enum Found<'a> {
    File(&'a toml::Value),
    Env(&'a EnvVar),
}

impl Found<'_> {
    /// For [`Reason::WrongType`]: `string "big"`, `TAPNAT_POD__MTU="big"`.
    fn describe(&self) -> String {
        match self {
            Found::Env(v) => format!("{}={:?}", v.var, v.value),
            Found::File(toml::Value::String(s)) => format!("string {s:?}"),
            Found::File(toml::Value::Integer(i)) => format!("integer {i}"),
            Found::File(toml::Value::Float(f)) => format!("float {f}"),
            Found::File(toml::Value::Boolean(b)) => format!("boolean {b}"),
            Found::File(toml::Value::Datetime(d)) => format!("datetime {d}"),
            Found::File(toml::Value::Array(_)) => "an array".to_string(),
            Found::File(toml::Value::Table(_)) => "a table".to_string(),
        }
    }
}

/// One table of the configuration being read.
pub(super) struct Table<'a> {
    /// The key path of this table; empty at the top.
    path: String,
    table: &'a toml::Table,
    env: &'a Env,
    /// The keys read so far, in order.
    read: Vec<&'static str>,
}

impl<'a> Table<'a> {
    /// The top of the merged file layers, with `env` above it.
    pub(super) fn root(table: &'a toml::Table, env: &'a Env) -> Self {
        Self::at(String::new(), table, env)
    }

    fn at(path: String, table: &'a toml::Table, env: &'a Env) -> Self {
        Table {
            path,
            table,
            env,
            read: Vec::new(),
        }
    }

    /// The full path of `name` in this table.
    pub(super) fn key(&self, name: &str) -> String {
        if self.path.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.path)
        }
    }

    fn wrong(&self, name: &str, expected: Kind, found: &Found<'_>) -> ConfigError {
        at(self.key(name))(Reason::WrongType {
            expected,
            found: found.describe(),
        })
    }

    /// A value from the file layers only (tables and lists).
    fn file(&mut self, name: &'static str) -> Option<&'a toml::Value> {
        self.read.push(name);
        self.table.get(name)
    }

    /// A scalar: the environment's value if it sets this key, else the file's.
    fn scalar(&mut self, name: &'static str) -> Option<Found<'a>> {
        let env = self.env.take(&self.key(name)).map(Found::Env);
        let file = self.file(name).map(Found::File);
        env.or(file)
    }

    /// A scalar that must be there.
    fn required(&mut self, name: &'static str) -> Result<Found<'a>, ConfigError> {
        self.scalar(name)
            .ok_or_else(|| at(self.key(name))(Reason::Missing))
    }

    pub(super) fn string(&mut self, name: &'static str) -> Result<String, ConfigError> {
        let found = self.required(name)?;
        self.as_string(name, found)
    }

    /// A string that may be absent.
    pub(super) fn opt_string(&mut self, name: &'static str) -> Result<Option<String>, ConfigError> {
        self.scalar(name)
            .map(|found| self.as_string(name, found))
            .transpose()
    }

    fn as_string(&self, name: &str, found: Found<'_>) -> Result<String, ConfigError> {
        match found {
            Found::File(toml::Value::String(s)) => Ok(s.clone()),
            Found::Env(v) => Ok(v.value.clone()),
            other => Err(self.wrong(name, Kind::String, &other)),
        }
    }

    /// An integer; from the environment, the decimal digits of one.
    pub(super) fn int(&mut self, name: &'static str) -> Result<i64, ConfigError> {
        match self.required(name)? {
            Found::File(toml::Value::Integer(i)) => Ok(*i),
            Found::Env(v) => v
                .value
                .trim()
                .parse()
                .map_err(|_| self.wrong(name, Kind::Integer, &Found::Env(v))),
            other => Err(self.wrong(name, Kind::Integer, &other)),
        }
    }

    /// A boolean; from the environment, exactly `true` or `false`.
    pub(super) fn bool(&mut self, name: &'static str) -> Result<bool, ConfigError> {
        match self.required(name)? {
            Found::File(toml::Value::Boolean(b)) => Ok(*b),
            Found::Env(v) if v.value == "true" => Ok(true),
            Found::Env(v) if v.value == "false" => Ok(false),
            other => Err(self.wrong(name, Kind::Boolean, &other)),
        }
    }

    /// A port (an integer) or a port range (a string), as text.
    pub(super) fn ports(&mut self, name: &'static str) -> Result<String, ConfigError> {
        match self.required(name)? {
            Found::File(toml::Value::Integer(i)) => Ok(i.to_string()),
            Found::File(toml::Value::String(s)) => Ok(s.clone()),
            Found::Env(v) => Ok(v.value.clone()),
            other => Err(self.wrong(name, Kind::Ports, &other)),
        }
    }

    /// An array of strings; absent means empty.
    pub(super) fn strings(&mut self, name: &'static str) -> Result<Vec<String>, ConfigError> {
        match self.file(name) {
            None => Ok(Vec::new()),
            Some(toml::Value::Array(items)) => items
                .iter()
                .enumerate()
                .map(|(i, item)| match item {
                    toml::Value::String(s) => Ok(s.clone()),
                    other => Err(at(format!("{}[{i}]", self.key(name)))(Reason::WrongType {
                        expected: Kind::String,
                        found: Found::File(other).describe(),
                    })),
                })
                .collect(),
            Some(other) => Err(self.wrong(name, Kind::Strings, &Found::File(other))),
        }
    }

    /// A table.
    pub(super) fn table(&mut self, name: &'static str) -> Result<Table<'a>, ConfigError> {
        match self.file(name) {
            None => Err(at(self.key(name))(Reason::Missing)),
            Some(toml::Value::Table(t)) => Ok(Table::at(self.key(name), t, self.env)),
            Some(other) => Err(self.wrong(name, Kind::Table, &Found::File(other))),
        }
    }

    /// An array of tables (`[[forward]]`); absent means empty.
    pub(super) fn tables(&mut self, name: &'static str) -> Result<Vec<Table<'a>>, ConfigError> {
        match self.file(name) {
            None => Ok(Vec::new()),
            Some(toml::Value::Array(items)) => items
                .iter()
                .enumerate()
                .map(|(i, item)| {
                    let path = format!("{}[{i}]", self.key(name));
                    match item {
                        toml::Value::Table(t) => Ok(Table::at(path, t, self.env)),
                        other => Err(at(path)(Reason::WrongType {
                            expected: Kind::Table,
                            found: Found::File(other).describe(),
                        })),
                    }
                })
                .collect(),
            Some(other) => Err(self.wrong(name, Kind::Tables, &Found::File(other))),
        }
    }

    /// After its keys were read: a key of the table that was not is unknown.
    pub(super) fn finish(self) -> Result<(), ConfigError> {
        match self.table.keys().find(|k| !self.read.contains(&k.as_str())) {
            Some(unknown) => Err(at(self.key(unknown))(Reason::UnknownKey {
                known: self.read,
            })),
            None => Ok(()),
        }
    }
}
