package dev.sessionaffinity.tomcat;

import java.io.ByteArrayInputStream;
import java.io.ByteArrayOutputStream;
import java.io.DataInputStream;
import java.io.DataOutputStream;
import java.io.IOException;
import java.io.InvalidClassException;
import java.io.NotSerializableException;
import java.io.ObjectInputFilter;
import java.io.ObjectInputStream;
import java.io.ObjectOutputStream;
import java.io.OutputStream;
import java.io.Serializable;
import java.util.Collections;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.SortedMap;
import java.util.TreeMap;
import java.util.regex.Pattern;

import jakarta.servlet.http.HttpSession;

import org.apache.catalina.Manager;
import org.apache.catalina.util.CustomObjectInputStream;
import org.apache.juli.logging.Log;
import org.apache.juli.logging.LogFactory;

import dev.sessionaffinity.tomcat.RestoreRefused.Reason;

/**
 * Session attributes in Java serialization form, each attribute in a stream
 * of its own, names sorted, so the same attributes give the same bytes (a
 * hash of them detects changes made inside stored objects) and one attribute
 * that cannot travel costs only itself:
 *
 * <pre>
 * count (int), then per attribute: name (UTF), length (int), serialized value
 * </pre>
 *
 * <p>Both sides check every class against the allow-list: writing, so an
 * attribute the other pods would refuse is left out (and named) at once, not
 * found at failover; reading, by name before any class is loaded or object
 * created.
 */
final class Attributes {

    private static final Log log = LogFactory.getLog(Attributes.class);
    /** Deeper object graphs than this are refused on read (a stack-exhaustion guard). */
    static final int MAX_DEPTH = 100;
    /** More objects and references than this in one attribute are refused on read (a CPU and memory guard). */
    static final long MAX_REFERENCES = 100_000;

    /** What write() produced: the bytes, each written attribute's size, and why others were left out. */
    static final class Written {
        final byte[] bytes;
        /** Serialized size per attribute written, by name. */
        final Map<String, Integer> sizes;
        /** Attribute name to why it cannot travel. */
        final Map<String, String> skipped;

        Written(byte[] bytes, Map<String, Integer> sizes, Map<String, String> skipped) {
            this.bytes = bytes;
            this.sizes = sizes;
            this.skipped = skipped;
        }
    }

    /** What read() got back: the attributes, and why the others could not be restored. */
    static final class Read {
        final Map<String, Object> values;
        /** Attribute name to why it was left out. */
        final Map<String, String> refused;

        Read(Map<String, Object> values, Map<String, String> refused) {
            this.values = values;
            this.refused = refused;
        }
    }

    private Attributes() {
    }

    /**
     * The session's attributes that can travel: Serializable, made only of
     * allowed classes, and distributable under the Manager's attribute filters
     * (if any are configured); plus extra values the valve carries itself.
     *
     * @throws IOException if an attribute fails to serialize for another reason
     *         (e.g. it changed while being written); nothing should be sent then
     */
    static Written write(HttpSession session, Manager manager, Pattern allowedClasses, Map<String, Object> extra)
            throws IOException {
        SortedMap<String, Object> values = new TreeMap<>(extra);
        for (String name : Collections.list(session.getAttributeNames())) {
            Object value = session.getAttribute(name);
            if (value != null && manager.willAttributeDistribute(name, value)) {
                values.put(name, value);
            }
        }
        return write(values, allowedClasses);
    }

    /** The values that can travel, in name order, and why the others cannot. */
    static Written write(SortedMap<String, Object> attributes, Pattern allowedClasses) throws IOException {
        ByteArrayOutputStream bytes = new ByteArrayOutputStream(512);
        Map<String, Integer> sizes = new LinkedHashMap<>();
        Map<String, String> skipped = new LinkedHashMap<>();
        Map<String, byte[]> values = new LinkedHashMap<>();
        for (Map.Entry<String, Object> entry : attributes.entrySet()) {
            Object value = entry.getValue();
            if (!(value instanceof Serializable)) {
                skipped.put(entry.getKey(), "not Serializable: " + value.getClass().getName());
                continue;
            }
            try {
                values.put(entry.getKey(), serialize(value, allowedClasses));
            } catch (NotAllowed e) {
                skipped.put(entry.getKey(), "holds " + e.classname + ", which allowedClasses does not allow");
            } catch (NotSerializableException e) {
                skipped.put(entry.getKey(), "holds " + e.getMessage() + ", which is not Serializable");
            }
        }
        try (DataOutputStream out = new DataOutputStream(bytes)) {
            out.writeInt(values.size());
            for (Map.Entry<String, byte[]> entry : values.entrySet()) {
                out.writeUTF(entry.getKey());
                out.writeInt(entry.getValue().length);
                out.write(entry.getValue());
                sizes.put(entry.getKey(), entry.getValue().length);
            }
        }
        return new Written(bytes.toByteArray(), sizes, skipped);
    }

    /**
     * The values read back from write()'s bytes, in name order. An attribute
     * whose classes are not allowed (or not found, or over the limits) is left
     * out and named; a framing error refuses the whole state.
     */
    static Read read(byte[] bytes, ClassLoader loader, Pattern allowedClasses) throws RestoreRefused {
        Map<String, Object> values = new LinkedHashMap<>();
        Map<String, String> refused = new LinkedHashMap<>();
        try (DataInputStream in = new DataInputStream(new ByteArrayInputStream(bytes))) {
            int count = in.readInt();
            if (count < 0 || count > bytes.length) {
                throw new RestoreRefused(Reason.MALFORMED, "attribute count " + count);
            }
            for (int i = 0; i < count; i++) {
                String name = in.readUTF();
                int length = in.readInt();
                if (length < 0 || length > in.available()) {
                    throw new RestoreRefused(Reason.MALFORMED, "attribute length " + length);
                }
                byte[] value = in.readNBytes(length);
                try {
                    values.put(name, deserialize(value, loader, allowedClasses));
                } catch (IOException | ClassNotFoundException | RuntimeException e) {
                    String message = e.getClass().getSimpleName() + ": " + e.getMessage();
                    refused.put(name, message.length() > 200 ? message.substring(0, 200) + "..." : message);
                }
            }
            if (in.read() != -1) {
                throw new RestoreRefused(Reason.MALFORMED, "data after the attributes");
            }
            return new Read(values, refused);
        } catch (IOException e) {
            throw new RestoreRefused(Reason.MALFORMED, "attributes: " + e.getClass().getSimpleName());
        }
    }

    private static Object deserialize(byte[] bytes, ClassLoader loader, Pattern allowedClasses)
            throws IOException, ClassNotFoundException {
        // Tomcat's stream checks each class name (and proxy interface) against the allow-list before loading it.
        try (ObjectInputStream in = new CustomObjectInputStream(new ByteArrayInputStream(bytes), loader, log,
                allowedClasses, false)) {
            in.setObjectInputFilter(limits(bytes.length));
            Object value = in.readObject();
            if (in.read() != -1) {
                throw new InvalidClassException("data after the attribute's object");
            }
            return value;
        }
    }

    /**
     * The JVM-wide filter (jdk.serialFilter) first, as a stream filter would
     * otherwise replace it; then the valve's limits: no array longer than the
     * attribute has bytes, no deeper graph than MAX_DEPTH, no more references
     * than MAX_REFERENCES.
     */
    private static ObjectInputFilter limits(int length) {
        ObjectInputFilter global = ObjectInputFilter.Config.getSerialFilter();
        return info -> {
            if (global != null && global.checkInput(info) == ObjectInputFilter.Status.REJECTED) {
                return ObjectInputFilter.Status.REJECTED;
            }
            return info.arrayLength() > length || info.depth() > MAX_DEPTH || info.references() > MAX_REFERENCES
                    ? ObjectInputFilter.Status.REJECTED : ObjectInputFilter.Status.UNDECIDED;
        };
    }

    /** The bytes of a session without attributes. */
    static byte[] none() {
        return new byte[4]; // a count of 0
    }

    /** The value's serialized bytes. */
    private static byte[] serialize(Object value, Pattern allowedClasses) throws IOException {
        ByteArrayOutputStream bytes = new ByteArrayOutputStream(256);
        try (Checked out = new Checked(bytes, allowedClasses)) {
            out.writeObject(value);
            if (out.refused != null) {
                throw new NotAllowed(out.refused);
            }
        }
        return bytes.toByteArray();
    }

    /**
     * Notes, while writing, the first class the reading side would refuse. It
     * does not throw: ObjectOutputStream then serializes the exception itself
     * into the stream, whose class would be refused in turn.
     */
    private static final class Checked extends ObjectOutputStream {
        private final Pattern allowedClasses;
        String refused;

        Checked(OutputStream out, Pattern allowedClasses) throws IOException {
            super(out);
            this.allowedClasses = allowedClasses;
        }

        @Override
        protected void annotateClass(Class<?> type) {
            check(type.getName());
        }

        @Override
        protected void annotateProxyClass(Class<?> type) {
            for (Class<?> face : type.getInterfaces()) {
                check(face.getName());
            }
        }

        private void check(String name) {
            if (refused == null && !allowedClasses.matcher(name).matches()) {
                refused = name;
            }
        }
    }

    /** A class outside the allow-list met while writing. */
    private static final class NotAllowed extends IOException {
        private static final long serialVersionUID = 1L;
        final String classname;

        NotAllowed(String classname) {
            super(classname + " is not in allowedClasses", null);
            this.classname = classname;
        }
    }

    /**
     * Builds the allow-list: safe JDK value types, plus the app's own pattern
     * if given (arrays of both). Refuses an app pattern that lets in a class
     * known to run code when deserialized (such as {@code .*}).
     */
    static Pattern allowList(String appClasses) {
        String classes = DEFAULT_CLASSES + (appClasses == null || appClasses.isBlank() ? "" : "|" + appClasses);
        Pattern pattern = Pattern.compile("(?:" + classes + ")|\\[+L(?:" + classes + "|java\\.lang\\.Object);|\\[+[BCDFIJSZ]");
        for (String gadget : GADGETS) {
            if (pattern.matcher(gadget).matches()) {
                throw new IllegalArgumentException("allowedClasses: '" + appClasses + "' allows " + gadget
                        + ", a class known to run code when deserialized; list only your app's packages, e.g. com\\.example\\.shop\\..*");
            }
        }
        return pattern;
    }

    /**
     * JDK classes that hold values and run no code of an attacker's choosing
     * when deserialized (their readObject only rebuilds the value). Some are
     * there because a common type writes them: ConcurrentHashMap its
     * Segments (ReentrantLocks), GregorianCalendar its ZoneInfo, EnumSet its
     * SerializationProxy.
     */
    static final String DEFAULT_CLASSES = String.join("|",
            "java\\.lang\\.(?:Boolean|Byte|Character|Short|Integer|Long|Float|Double|Number|String|Enum"
                    + "|String\\$CaseInsensitiveComparator)",
            "java\\.math\\.(?:BigInteger|BigDecimal)",
            "java\\.net\\.URI",
            "java\\.sql\\.(?:Date|Time|Timestamp)",
            "java\\.util\\.(?:ArrayList|LinkedList|ArrayDeque|Vector|Stack|HashMap|LinkedHashMap|TreeMap|Hashtable"
                    + "|HashSet|LinkedHashSet|TreeSet|EnumMap|EnumSet\\$SerializationProxy|BitSet"
                    + "|Date|Calendar|GregorianCalendar|TimeZone|SimpleTimeZone|UUID|Locale|Currency|CollSer"
                    + "|Arrays\\$ArrayList|Collections\\$(?:Unmodifiable|Synchronized|Empty|Singleton)\\w*"
                    + "|Collections\\$ReverseComparator2?)",
            "java\\.util\\.concurrent\\.(?:ConcurrentHashMap|ConcurrentHashMap\\$Segment|ConcurrentSkipListMap"
                    + "|ConcurrentSkipListSet|ConcurrentLinkedQueue|ConcurrentLinkedDeque|CopyOnWriteArrayList"
                    + "|CopyOnWriteArraySet|atomic\\.Atomic(?:Integer|Long|Boolean)"
                    + "|locks\\.ReentrantLock(?:\\$Sync|\\$NonfairSync)?|locks\\.AbstractQueuedSynchronizer"
                    + "|locks\\.AbstractOwnableSynchronizer)",
            "sun\\.util\\.calendar\\.ZoneInfo",
            "java\\.time\\.Ser",
            "dev\\.sessionaffinity\\.tomcat\\.Login");

    /** Classes an allow-list must never match: deserialization gadgets and the types they hide behind. */
    static final List<String> GADGETS = List.of(
            "java.lang.Object",
            "java.lang.reflect.Proxy",
            "java.net.URL",
            "java.util.PriorityQueue",
            "javax.management.BadAttributeValueExpException",
            "org.apache.commons.collections.functors.InvokerTransformer",
            "org.apache.commons.collections4.functors.InvokerTransformer",
            "org.apache.commons.beanutils.BeanComparator",
            "org.springframework.beans.factory.ObjectFactory",
            "com.sun.org.apache.xalan.internal.xsltc.trax.TemplatesImpl",
            "org.codehaus.groovy.runtime.ConvertedClosure",
            "com.mchange.v2.c3p0.PoolBackedDataSource");
}
