package vmagent

import "encoding/binary"

// nativeEndian is how netlink lays out its integers.
var nativeEndian = binary.NativeEndian
