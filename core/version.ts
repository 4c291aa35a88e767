// The release version; package.json carries the same number (a unit test keeps them equal).
export const VERSION = "0.1.0";
