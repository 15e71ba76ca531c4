pub struct Options {
    pub controller: String,
    pub user: String,
    pub password: String,
    pub tenant: String,
}
pub fn run(_o: Options, _c: Option<&str>) -> Result<(), String> {
    Err("todo".into())
}
