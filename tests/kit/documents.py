"""Sample schemas, documents and the standard configuration the tests use.

``VALID`` is ``order(1)``: every valid order is made by :func:`order`, so a
test that needs a second one changes its id, not its shape.
"""

from __future__ import annotations

ORDER_XSD = """\
<?xml version="1.0" encoding="UTF-8"?>
<xs:schema xmlns:xs="http://www.w3.org/2001/XMLSchema">
  <xs:element name="order">
    <xs:complexType>
      <xs:sequence>
        <xs:element name="sku" type="xs:string"/>
        <xs:element name="qty" type="xs:positiveInteger"/>
      </xs:sequence>
      <xs:attribute name="id" type="xs:string" use="required"/>
    </xs:complexType>
  </xs:element>
</xs:schema>
"""

# A warehouse's stock export, XSD-checked as it streams (tests/test_bigjobs.py, bench bigjob).
STOCK_XSD = """\
<?xml version="1.0" encoding="UTF-8"?>
<xs:schema xmlns:xs="http://www.w3.org/2001/XMLSchema" elementFormDefault="qualified">
  <xs:element name="stock">
    <xs:complexType>
      <xs:sequence>
        <xs:element name="item" maxOccurs="unbounded">
          <xs:complexType>
            <xs:sequence>
              <xs:element name="sku" type="xs:string"/>
              <xs:element name="name" type="xs:string"/>
              <xs:element name="qty" type="xs:nonNegativeInteger"/>
              <xs:element name="bin" type="xs:string"/>
            </xs:sequence>
            <xs:attribute name="n" type="xs:positiveInteger" use="required"/>
          </xs:complexType>
        </xs:element>
      </xs:sequence>
      <xs:attribute name="warehouse" type="xs:string" use="required"/>
    </xs:complexType>
  </xs:element>
</xs:schema>
"""

STOCK_RNG = """\
<?xml version="1.0" encoding="UTF-8"?>
<element name="stock" xmlns="http://relaxng.org/ns/structure/1.0"
         datatypeLibrary="http://www.w3.org/2001/XMLSchema-datatypes">
  <oneOrMore>
    <element name="item">
      <attribute name="sku"/>
      <data type="nonNegativeInteger"/>
    </element>
  </oneOrMore>
</element>
"""


def order(n: int | str = 1, sku: str = "HAM-1", qty: int = 3) -> bytes:
    """A valid order document (for :data:`ORDER_XSD`)."""
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<order id="{n}">\n'
        f"  <sku>{sku}</sku>\n  <qty>{qty}</qty>\n</order>\n"
    ).encode()


# A valid order.
VALID = order(1)

# Well-formed, but line 4 breaks the schema (qty must be positive).
INVALID = b"""\
<?xml version="1.0" encoding="UTF-8"?>
<order id="2">
  <sku>HAM-1</sku>
  <qty>-4</qty>
</order>
"""

# Not well-formed: the end tag on line 5 (column 10) does not match.
BROKEN = b"""\
<?xml version="1.0" encoding="UTF-8"?>
<order id="3">
  <sku>HAM-1</sku>
  <qty>3</qty>
</orders>
"""

STOCK_VALID = b'<stock>\n  <item sku="HAM-1">5</item>\n</stock>\n'
STOCK_INVALID = b'<stock>\n  <item sku="HAM-1">many</item>\n</stock>\n'

# The standard configuration (see kit.site.make_site): an inbound interface
# with an XSD, an outbound one, and an inbound one with a RELAX NG schema.
CONFIG = """\
spool: spool
interfaces:
  orders_in:
    schema: schemas/order.xsd
    command: [/bin/true]
    timeout: 30s
    max_size: 1KB
  orders_out:
    schema: schemas/order.xsd
  stock_in:
    schema: schemas/stock.rng
    command: [/bin/true]
"""
INTERFACES = ("orders_in", "orders_out", "stock_in")

# The directories docs/spec.rst ("The spool tree") promises for CONFIG.
SPOOL_DIRS = (
    *(f"{state}/{iface}" for state in ("incoming", "queue", "bak") for iface in INTERFACES),
    "joberrors",
    "tmp",
    "state",
)
